# Flywheel: the user moved or copied this message out of Junk, so they say it is not spam (ham).
# Run by IMAPSieve (imapsieve_mailbox2_before in 90-flywheel.conf); compile with `sievec`.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "vnd.dovecot.environment", "variables"];

# Deleting spam from Junk is not calling it ham.
if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string :is "${mailbox}" ["Trash", "Deleted Items", "Deleted Messages"] {
  stop;
}

if environment :matches "imap.user" "*" {
  set "user" "${1}";
}

pipe :copy "flywheel-feedback" [
  "--url=${env.vnd.dovecot.config.flywheel_url}",
  "--key-file=${env.vnd.dovecot.config.flywheel_key_file}",
  "--timeout=${env.vnd.dovecot.config.flywheel_timeout}",
  "ham", "${user}"
];
