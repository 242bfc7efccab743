"""vhostd: a vhost-user back-end daemon for virtio-blk and virtio-net."""

# The one place for the version: pyproject.toml reads it (dynamic), `vhostd
# --version` prints it, and debian/rules refuses a changelog that disagrees.
__version__ = "0.1.0"
