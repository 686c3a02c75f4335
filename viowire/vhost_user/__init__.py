"""vhost-user: viowire's devices served to a vhost-user front-end such as QEMU.

``protocol`` is the wire format (sans-IO), ``memory`` the front-end's memory table,
``inflight`` the buffer that tracks requests in flight across reconnects, ``backend`` the
transport state of one device (and its channel to the front-end), ``server`` the sockets,
``frontend`` a front-end (tests drive the back-end with it), ``cli`` the ``viowire vhost-user``
command.
"""
