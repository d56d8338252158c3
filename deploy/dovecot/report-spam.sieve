# Flywheel: the user moved or copied this message into Junk, so they say it is spam.
# Run by IMAPSieve (imapsieve_mailbox1_before in 90-flywheel.conf); compile with `sievec`.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "vnd.dovecot.environment", "variables"];

if environment :matches "imap.user" "*" {
  set "user" "${1}";
}

pipe :copy "flywheel-feedback" [
  "--url=${env.vnd.dovecot.config.flywheel_url}",
  "--key-file=${env.vnd.dovecot.config.flywheel_key_file}",
  "--timeout=${env.vnd.dovecot.config.flywheel_timeout}",
  "spam", "${user}"
];
