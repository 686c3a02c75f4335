"""vhost-user: viowire's devices served to a vhost-user front-end such as QEMU.

``protocol`` is the wire format (sans-IO), ``memory`` the front-end's memory table,
``backend`` the transport state of one device, ``server`` the sockets, ``frontend`` a
front-end (tests drive the back-end with it), ``cli`` the ``viowire vhost-user`` command.
"""
