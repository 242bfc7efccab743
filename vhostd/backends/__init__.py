"""Where device data goes: host-side back-ends (tap devices; block files are
opened by the blk device itself)."""
