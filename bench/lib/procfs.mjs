// Readers for /proc: CPU time per process tree, RSS, per-CPU busy time and
// CPU used by processes outside the benchmark.
import { execFileSync } from 'node:child_process'
import { readFileSync, readdirSync, readlinkSync } from 'node:fs'

const PF_KTHREAD = 0x00200000

function readText (path) {
  try {
    return readFileSync(path, 'utf8')
  } catch {
    return null
  }
}

// Fields of /proc/<pid>/stat after the command name (which may contain spaces
// and parentheses). Returned array index 0 is field 3 (state).
function statFields (pid) {
  const text = readText(`/proc/${pid}/stat`)
  if (text === null) return null
  const end = text.lastIndexOf(')')
  return text.slice(end + 2).trim().split(' ')
}

function listPids () {
  const pids = []
  for (const name of readdirSync('/proc')) {
    if (name.charCodeAt(0) >= 48 && name.charCodeAt(0) <= 57) pids.push(Number(name))
  }
  return pids
}

// Clock ticks per second for utime/stime in /proc/<pid>/stat (USER_HZ).
export const CLK_TCK = (() => {
  try {
    const v = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim())
    return v > 0 ? v : 100
  } catch {
    return 100
  }
})()

/** Snapshot of every process: pid -> { ppid, ticks (utime+stime), start, kthread }. */
export function processTable () {
  const table = new Map()
  for (const pid of listPids()) {
    const f = statFields(pid)
    if (f === null) continue
    // f[0]=state(3) f[1]=ppid(4) f[6]=flags(9) f[11]=utime(14) f[12]=stime(15) f[19]=starttime(22)
    table.set(pid, {
      ppid: Number(f[1]),
      ticks: Number(f[11]) + Number(f[12]),
      start: f[19],
      kthread: (Number(f[6]) & PF_KTHREAD) !== 0 || pid === 2 || Number(f[1]) === 2
    })
  }
  return table
}

/** pid and all of its descendants (from a processTable snapshot, or a fresh one). */
export function processTree (rootPid, table = processTable()) {
  const children = new Map()
  for (const [pid, p] of table) {
    if (!children.has(p.ppid)) children.set(p.ppid, [])
    children.get(p.ppid).push(pid)
  }
  const out = []
  const stack = [rootPid]
  while (stack.length > 0) {
    const pid = stack.pop()
    if (!table.has(pid)) continue
    out.push(pid)
    for (const c of children.get(pid) ?? []) stack.push(c)
  }
  return out
}

/** On-CPU nanoseconds of all threads of the given processes (schedstat field 1). */
export function treeCpuNs (pids) {
  let total = 0
  for (const pid of pids) {
    let tasks
    try {
      tasks = readdirSync(`/proc/${pid}/task`)
    } catch {
      continue
    }
    for (const tid of tasks) {
      const text = readText(`/proc/${pid}/task/${tid}/schedstat`)
      if (text === null) continue
      total += Number(text.split(' ')[0])
    }
  }
  return total
}

/** VmRSS in KiB of one process (null if gone). */
export function rssKiB (pid) {
  const text = readText(`/proc/${pid}/status`)
  if (text === null) return null
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(text)
  return m ? Number(m[1]) : null
}

/** Sum of VmRSS over processes, in KiB. */
export function treeRssKiB (pids) {
  let total = 0
  let any = false
  for (const pid of pids) {
    const v = rssKiB(pid)
    if (v !== null) {
      total += v
      any = true
    }
  }
  return any ? total : null
}

/** Number of open file descriptors over processes. */
export function treeFdCount (pids) {
  let n = 0
  for (const pid of pids) {
    try {
      n += readdirSync(`/proc/${pid}/fd`).length
    } catch {}
  }
  return n
}

/** Per-CPU jiffies from /proc/stat: { cpu: {busy, total, steal}, cpu0: ..., cpu1: ... }. */
export function cpuStat () {
  const out = {}
  for (const line of readFileSync('/proc/stat', 'utf8').split('\n')) {
    if (!line.startsWith('cpu')) break
    const parts = line.split(/\s+/)
    const [user, nice, system, idle, iowait, irq, softirq, steal] = parts.slice(1, 9).map(Number)
    const busy = user + nice + system + irq + softirq
    out[parts[0]] = { busy, total: busy + idle + iowait + steal, steal }
  }
  return out
}

/** Busy % per CPU between two cpuStat() snapshots. */
export function cpuBusyPct (before, after) {
  const out = {}
  for (const key of Object.keys(after)) {
    if (!before[key]) continue
    const total = after[key].total - before[key].total
    out[key] = total > 0 ? (100 * (after[key].busy - before[key].busy)) / total : 0
    out[key + 'StealJiffies'] = after[key].steal - before[key].steal
  }
  return out
}

/**
 * CPU used by user-space processes outside `excludeRoot`'s process tree
 * between two processTable() snapshots, in % of one core over wallSeconds.
 * Processes that both started and exited inside the window are not seen.
 */
export function otherCpuPct (before, after, excludeRoot, wallSeconds) {
  const excluded = new Set([...processTree(excludeRoot, before), ...processTree(excludeRoot, after)])
  let ticks = 0
  const top = []
  for (const [pid, p] of after) {
    if (p.kthread || excluded.has(pid)) continue
    const prev = before.get(pid)
    const delta = prev && prev.start === p.start ? p.ticks - prev.ticks : p.ticks
    if (delta > 0) {
      ticks += delta
      top.push({ pid, ticks: delta })
    }
  }
  top.sort((a, b) => b.ticks - a.ticks)
  return {
    pct: wallSeconds > 0 ? (100 * ticks) / CLK_TCK / wallSeconds : 0,
    topPids: top.slice(0, 3).map((t) => ({ pid: t.pid, comm: comm(t.pid), pct: (100 * t.ticks) / CLK_TCK / wallSeconds }))
  }
}

function comm (pid) {
  const text = readText(`/proc/${pid}/comm`)
  return text === null ? '?' : text.trim()
}

/** Socket inodes of ESTABLISHED TCP connections (IPv4 and IPv6) whose local port is `port`. */
function establishedInodes (port) {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0')
  const inodes = new Set()
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    const text = readText(file)
    if (text === null) continue
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/)
      if (cols.length < 10) continue
      if (cols[3] === '01' && cols[1].endsWith(':' + hexPort)) inodes.add(cols[9])
    }
  }
  return inodes
}

/** ESTABLISHED TCP connections to local port `port` (accepted or still in the accept queue). */
export function establishedOnPort (port) {
  return establishedInodes(port).size
}

/** ESTABLISHED connections to local port `port` that the processes have accepted (hold an fd for). */
export function acceptedOnPort (pids, port) {
  const inodes = establishedInodes(port)
  let n = 0
  for (const pid of pids) {
    let fds
    try {
      fds = readdirSync(`/proc/${pid}/fd`)
    } catch {
      continue
    }
    for (const fd of fds) {
      let link
      try {
        link = readlinkSync(`/proc/${pid}/fd/${fd}`)
      } catch {
        continue
      }
      if (link.startsWith('socket:[') && inodes.has(link.slice(8, -1))) n++
    }
  }
  return n
}

/** TcpExt counters from /proc/net/netstat (ListenOverflows, ListenDrops, SyncookiesSent). */
export function tcpExt () {
  const text = readText('/proc/net/netstat')
  const out = { ListenOverflows: 0, ListenDrops: 0, SyncookiesSent: 0 }
  if (text === null) return out
  const lines = text.split('\n').filter((l) => l.startsWith('TcpExt:'))
  if (lines.length < 2) return out
  const names = lines[0].split(/\s+/)
  const values = lines[1].split(/\s+/)
  for (const k of Object.keys(out)) {
    const i = names.indexOf(k)
    if (i > 0) out[k] = Number(values[i])
  }
  return out
}
