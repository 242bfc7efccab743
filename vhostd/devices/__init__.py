"""virtio devices served by vhostd.  The protocol layer sees them only
through ``vhostd.devices.base.Device``."""
