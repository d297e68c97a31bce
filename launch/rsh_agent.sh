#!/bin/sh
# OpenMPI's remote-shell agent for an emulated cluster (launch/mpi.py sets it with
# `--mca plm_rsh_agent`): called as `rsh_agent.sh HOST COMMAND...` where ssh would be called as
# `ssh HOST COMMAND...`, it runs COMMAND inside HOST's network namespace. COMMCOMP_NETNS_MAP lists
# "ADDRESS=NAMESPACE" pairs separated by spaces. Like ssh, it hands the command to a shell as one string.
host="$1"
shift
for pair in $COMMCOMP_NETNS_MAP; do
  if [ "${pair%%=*}" = "$host" ]; then
    exec ip netns exec "${pair#*=}" /bin/sh -c "$*"
  fi
done
echo "commcomp rsh agent: host $host is not in this cluster (COMMCOMP_NETNS_MAP=$COMMCOMP_NETNS_MAP)" >&2
exit 255
