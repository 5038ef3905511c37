"""The control plane's wire: backends register and unregister themselves over a TCP control
channel, and root talks to the daemon over an admin Unix socket. Both carry JSON lines.

- `lbnat.control.protocol`: pure parsing, validation, HMAC authentication and replies
  (docs/control-protocol.md is the wire format for writers of backends in any language).
- `lbnat.control.server`: the I/O around it.

Nothing is imported here, so importing one part does not import the other.
"""
