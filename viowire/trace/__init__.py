"""Message traces: every frame a viowire peer sends or receives, with its time, in a file.

``format`` defines the file (with construct, as the protocol's messages are), ``recorder``
writes it from the server sessions and client connections, ``show`` decodes it with the
protocol's own definitions, ``dissector`` generates a Wireshark dissector from them.
docs/trace.md describes the format. (``viowire.client.trace`` is another thing: the register
accesses of ``viowire demo``, by their spec names.)
"""
