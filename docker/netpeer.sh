#!/bin/sh
# A `netpeer` of docker-compose.yml: the server's virtio-net device (on its link "lan") as this
# container's vw0, an address on the overlay 10.204.0.0/16 from the device's MAC, then a ping of
# another netpeer found by a broadcast ping. Exit status 0 when 10 pings to it all came back.
#
# Needs ip and ping (the image installs iproute2 and iputils-ping), CAP_NET_ADMIN and
# /dev/net/tun (cap_add and devices in the compose file), and answers broadcast pings
# (sysctls: net.ipv4.icmp_echo_ignore_broadcasts=0) so the others can find it.
set -u
target=${VIOWIRE_TARGET:-tcp://server:7000}
overlay=${NETPEER_OVERLAY:-10.204}
linger=${NETPEER_LINGER:-10}   # seconds to keep answering after our own pings, for the others

viowire net-attach --memory proxied "$target" --tap vw0 &
attach=$!
trap 'kill "$attach" 2>/dev/null; wait "$attach"' EXIT
trap 'exit 143' INT TERM

tries=0
until ip link show vw0 2>/dev/null | grep -q LOWER_UP; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ] || ! kill -0 "$attach" 2>/dev/null; then
        echo "netpeer: vw0 did not come up" >&2
        exit 1
    fi
    sleep 0.1
done
mac=$(cat /sys/class/net/vw0/address)
me=$overlay.$((0x$(echo "$mac" | cut -d: -f5))).$((0x$(echo "$mac" | cut -d: -f6)))
ip addr add "$me/16" dev vw0
echo "netpeer: vw0 $mac $me"

other=""
for _ in $(seq 30); do
    other=$(ping -b -w 1 -i 0.2 "$overlay.255.255" 2>/dev/null \
        | sed -n 's/^[0-9]* bytes from \([0-9.]*\):.*/\1/p' | grep -vxF "$me" | head -n 1)
    [ -n "$other" ] && break
done
if [ -z "$other" ]; then
    echo "netpeer: $me found no other netpeer on the link" >&2
    exit 1
fi
# 10 pings, one at a time, each answered within 5 s. Not one `ping -c 10`: with a deadline (-w)
# it sends until 10 replies are back, so on busy cores the requests still on their way count as
# loss; without one it waits only twice the largest round trip so far for the last reply.
received=0
for _ in $(seq 10); do
    ping -q -c 1 -W 5 "$other" >/dev/null 2>&1 && received=$((received + 1))
done
result="10 packets transmitted, $received received, $(((10 - received) * 10))% packet loss"
status=0
[ "$received" = 10 ] || status=1
echo "netpeer: $me -> $other: $result"
sleep "$linger"
exit "$status"
