"""The benchmark suite behind ``viowire bench`` and ``benchmarks/run.py``.

Every figure is measured beside a bare baseline of the same job, in the same run, on the same
event loop and socket kind, and reported as the ratio of the two (``stats``). The pieces:

- ``bare``: a bare ``asyncio.Protocol`` request/reply and pipelined echo (server and client);
- ``ring``: a bare two-process split ring over a memfd, notified both ways with eventfds;
- ``cases``: the same jobs through viowire's client against a viowire server;
- ``server``: the viowire server as a child process, with a timestamping entropy device;
- ``memory``: server RSS per idle device, and its bare floor;
- ``worker``: one client process per (event loop, socket kind) that runs the cases;
- ``options``: the command's options (light: the ``viowire`` parser imports them);
- ``suite``: spawns the processes, collects the results, prints the table or JSON, profiles.
"""
