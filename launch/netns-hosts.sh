#!/usr/bin/env bash
# Stand-in "hosts" on one machine: network namespaces joined over TCP, for testing mdopt
# across hosts (link cuts, lost hosts) without a cluster. Needs root (CAP_NET_ADMIN) and
# iproute2.
#
# Usage:
#   launch/netns-hosts.sh up NAME SUBNET N   N namespaces NAME-1..NAME-N, each with one veth
#                                            pair to a bridge NAME-br in this namespace;
#                                            host K is SUBNET.(10+K)/24 on its eth0, the
#                                            bridge SUBNET.1 (SUBNET: three octets, 10.77.3).
#                                            Prints a hostfile (one slot per host) on stdout
#   launch/netns-hosts.sh down NAME          removes them (idempotent): kills what still
#                                            runs in each namespace, deletes the namespaces,
#                                            the veths and the bridge
#   launch/netns-hosts.sh link NAME K up|down  host K's cable: its veth on the bridge side
#   launch/netns-hosts.sh pids NAME K        the processes in host K's namespace
#   launch/netns-hosts.sh agent HOST CMD...  Open MPI's rsh agent (plm_rsh_agent): runs CMD
#                                            in the namespace that owns address HOST, under
#                                            that namespace's name as hostname
#
# Names: NAME must be at most 10 characters (interface names are limited to 15).
#
# The agent exits 0 whatever CMD does. Open MPI's rsh launcher treats any abnormal exit of its
# agent as a daemon that failed to start and ends the whole job, even long after the start;
# the agent stands for ssh, which on a real host that dies stays up until its keepalive gives
# up (never, by default), so the job learns of the loss through its own TCP connections
# instead (see launch/mpirun.sh --survive).
set -euo pipefail

die() { echo "launch/netns-hosts.sh: $*" >&2; exit 2; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    [ $# -eq 3 ] || die "up NAME SUBNET N"
    name="$1" subnet="$2" n="$3"
    [ "${#name}" -le 10 ] || die "NAME '$name' is longer than 10 characters"
    ip link add "$name-br" type bridge
    ip addr add "$subnet.1/24" dev "$name-br"
    ip link set "$name-br" up
    for k in $(seq 1 "$n"); do
      ns="$name-$k"
      ip netns add "$ns"
      ip link add "$name-v$k" type veth peer name eth0 netns "$ns"
      ip link set "$name-v$k" master "$name-br" up
      ip -n "$ns" addr add "$subnet.$((10 + k))/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
      echo "$subnet.$((10 + k)) slots=1"
    done
    ;;
  down)
    [ $# -eq 1 ] || die "down NAME"
    name="$1"
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
      case "$ns" in
        "$name"-[0-9]*)
          # SIGKILL, one process id at a time: nothing outside the namespace is touched.
          for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
          ip netns delete "$ns" 2>/dev/null || true
          ;;
      esac
    done
    # Deleting a namespace deletes its veth ends, and with them the peers on the bridge.
    for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
      case "$dev" in "$name"-v[0-9]*|"$name"-br) ip link delete "$dev" 2>/dev/null || true ;; esac
    done
    ;;
  link)
    [ $# -eq 3 ] || die "link NAME K up|down"
    ip link set "$1-v$2" "$3"
    ;;
  pids)
    [ $# -eq 2 ] || die "pids NAME K"
    ip netns pids "$1-$2"
    ;;
  agent)
    [ $# -ge 2 ] || die "agent HOST CMD..."
    host="$1"
    shift
    target=""
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
      if ip -n "$ns" -4 -o addr show 2>/dev/null | grep -q " inet $host/"; then target="$ns"; break; fi
    done
    [ -n "$target" ] || die "no namespace has address $host"
    # Open MPI passes the remote command as words of one shell command line, as to ssh. The
    # host gets a hostname of its own (a UTS namespace): Open MPI names its per-node session
    # directory in /tmp after it, and daemons of one job sharing one (the same hostname on
    # every namespace) overwrite each other's shared topology file there and crash.
    ip netns exec "$target" unshare --uts /bin/sh -c "hostname '$target' && $*" || true
    exit 0
    ;;
  *) die "unknown command '$cmd' (up, down, link, pids, agent)" ;;
esac
