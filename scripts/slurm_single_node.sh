#!/usr/bin/env bash
# A one-node Slurm cluster on loopback for the tests (CI runs this as root on Debian): munge, slurmctld and
# slurmd from Debian's slurm-wlm, one CPU partition `debug` holding this machine. No accounting database
# (the executor watches the queue with squeue). `stop-slurmd` / `start-slurmd` are what the failure test
# uses to take the node away and bring it back.
set -euo pipefail

conf=/etc/slurm/slurm.conf
case "${1:-start}" in
  stop-slurmd) kill "$(cat /run/slurmd.pid)"; exit 0 ;;
  start-slurmd) slurmd -N localhost; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop-slurmd|start-slurmd]" >&2; exit 2 ;;
esac

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

# munge: a key, then the daemon (it refuses to start with loose permissions).
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- munged

cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$conf" <<CONF
ClusterName=streamkv-ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Notice a lost node within seconds (the failure test stops slurmd), not the default five minutes.
SlurmdTimeout=10
SlurmctldTimeout=10
MinJobAge=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd -N localhost   # the node is named localhost whatever the hostname
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)$'; then
    sinfo
    exit 0
  fi
  sleep 1
done
echo "slurm: the node did not come up" >&2
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
