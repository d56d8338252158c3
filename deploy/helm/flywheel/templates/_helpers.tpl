{{/* Names and labels shared by every object. */}}
{{- define "flywheel.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flywheel.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flywheel.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flywheel.apiKeysSecret" -}}
{{- if .Values.apiKeys.keys -}}
{{ include "flywheel.fullname" . }}-api-keys
{{- else -}}
{{ required "apiKeys.existingSecret or apiKeys.keys must be set" .Values.apiKeys.existingSecret }}
{{- end -}}
{{- end -}}

{{/* FLYWHEEL_* settings common to every pod: Kafka, the shared registry, then the user's env. */}}
{{- define "flywheel.env" -}}
- name: FLYWHEEL_KAFKA_BOOTSTRAP
  value: {{ required "kafka.bootstrap must be set" .Values.kafka.bootstrap | quote }}
- name: FLYWHEEL_STATE_DIR
  value: /var/lib/flywheel
- name: FLYWHEEL_REGISTRY_DIR
  value: /var/lib/flywheel-registry
- name: FLYWHEEL_KAFKA_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
- name: FLYWHEEL_KAFKA_SASL_MECHANISM
  value: {{ .Values.kafka.sasl.mechanism | quote }}
- name: FLYWHEEL_KAFKA_SASL_USERNAME
  value: {{ required "kafka.sasl.username must be set for a SASL protocol" .Values.kafka.sasl.username | quote }}
- name: FLYWHEEL_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.passwordSecret.name must be set for a SASL protocol" .Values.kafka.sasl.passwordSecret.name }}
      key: {{ .Values.kafka.sasl.passwordSecret.key }}
{{- end }}
{{- if .Values.kafka.tls.caSecret.name }}
- name: FLYWHEEL_KAFKA_SSL_CAFILE
  value: /run/secrets/flywheel-kafka-ca/ca.pem
{{- end }}
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "flywheel.scrapeAnnotations" -}}
{{- if .root.Values.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* The Kafka CA's Secret as a volume and its mount, when one is named (every pod that talks to Kafka). */}}
{{- define "flywheel.kafkaCaVolume" -}}
{{- if .Values.kafka.tls.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret.name }}
    items: [{key: {{ .Values.kafka.tls.caSecret.key }}, path: ca.pem}]
{{- end }}
{{- end -}}

{{- define "flywheel.kafkaCaMount" -}}
{{- if .Values.kafka.tls.caSecret.name }}
- {name: kafka-ca, mountPath: /run/secrets/flywheel-kafka-ca, readOnly: true}
{{- end }}
{{- end -}}
