"""The vhost-user protocol: constants, message codec, socket channel and the
per-connection session that drives a device."""
