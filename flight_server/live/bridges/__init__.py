"""Bridges: facility streams (ZMQ, in their own formats) into live streams, with no change on
the sending side. `bridge.Bridge` runs one; each format decodes its messages (`formats.Format`):
`lclstreamer` (the seed's in-memory HDF5 files), `dectris` (Stream V2 / SIMPLON CBOR),
`karabo` (European XFEL's karabo-bridge)."""
