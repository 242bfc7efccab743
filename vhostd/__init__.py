"""vhostd: a vhost-user back-end daemon for virtio-blk and virtio-net."""
