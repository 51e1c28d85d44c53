/**
 * A real etcd (Debian package `etcd-server`; `.ci/run` installs it when missing) for a test:
 * one or three members on loopback ports, each in a temp data dir, stopped in teardown
 * (SIGTERM, then SIGKILL). A missing binary is a failure with the install command, never a skip.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { freePort, stopProcess } from './services.js'
import { eventually } from './http.js'

export const ETCD_MISSING = 'etcd not found: install it with `apt-get install -y etcd-server` (.ci/run does)'

export interface EtcdMember {
  name: string
  clientUrl: string
  peerUrl: string
  dataDir: string
  proc: ChildProcess | null
  /** Everything it printed (for failure messages). */
  output: string
}

export interface EtcdCluster {
  members: EtcdMember[]
  endpoints: string[]
  /** Kill one member (SIGKILL: it dies as a crashed node does). */
  kill: (i: number) => Promise<void>
  /** Start a stopped member again on its ports and data dir; resolves once the cluster is healthy. */
  restart: (i: number) => Promise<void>
  /** Freeze / thaw a member (SIGSTOP / SIGCONT): it keeps its connections but answers nothing. */
  pause: (i: number) => void
  resume: (i: number) => void
  stop: () => Promise<void>
}

/** Start a `size`-member cluster; with `start: false` it is laid out (ports, dirs) but not started. */
export async function startEtcd (t: Test, size: 1 | 3 = 1, options: { start?: boolean } = {}): Promise<EtcdCluster> {
  const root = mkdtempSync(join(tmpdir(), 'breakwater-etcd-'))
  const members: EtcdMember[] = []
  for (let i = 0; i < size; i++) members.push({ name: `m${i}`, clientUrl: '', peerUrl: '', dataDir: join(root, `m${i}`), proc: null, output: '' })
  const placePorts = async (): Promise<void> => {
    for (const m of members) {
      m.clientUrl = `http://127.0.0.1:${await freePort()}`
      m.peerUrl = `http://127.0.0.1:${await freePort()}`
      rmSync(m.dataDir, { recursive: true, force: true })
    }
  }
  await placePorts()
  const launch = (m: EtcdMember): void => {
    const proc = spawn('etcd', [
      '--name', m.name,
      '--data-dir', m.dataDir,
      '--listen-client-urls', m.clientUrl,
      '--advertise-client-urls', m.clientUrl,
      '--listen-peer-urls', m.peerUrl,
      '--initial-advertise-peer-urls', m.peerUrl,
      '--initial-cluster', members.map((x) => `${x.name}=${x.peerUrl}`).join(','),
      '--initial-cluster-state', 'new',
      '--initial-cluster-token', 'breakwater-test',
      '--heartbeat-interval', '100',
      '--election-timeout', '1000',
      '--logger', 'zap',
      '--log-level', 'warn'
    ], { stdio: ['ignore', 'pipe', 'pipe'] })
    m.proc = proc
    m.output = ''
    const keep = (c: Buffer): void => { m.output = (m.output + c.toString('utf8')).slice(-4000) }
    proc.stdout?.on('data', keep)
    proc.stderr?.on('data', keep)
    proc.on('error', (err: NodeJS.ErrnoException) => { m.output += err.code === 'ENOENT' ? ETCD_MISSING : err.message })
    proc.on('exit', () => { if (m.proc === proc) m.proc = null })
  }
  const clashed = (): boolean => members.some((m) => m.proc === null && /address already in use/.test(m.output))
  const healthy = async (): Promise<void> => {
    const ok = await eventually(async () => {
      if (clashed()) return true
      for (const m of members) {
        if (m.proc === null) continue
        const res = await fetch(`${m.clientUrl}/health`).catch(() => null)
        if (res === null) return false
        const body = await res.json().catch(() => null) as { health?: string } | null
        if (body?.health !== 'true') return false
      }
      return true
    }, 60_000, 50)
    if (!ok || clashed()) throw new Error(`etcd not healthy: ${members.map((m) => `${m.name}: ${m.proc === null ? 'exited' : 'running'} ${m.output.slice(-600)}`).join(' | ')}`)
  }
  const cluster: EtcdCluster = {
    members,
    get endpoints () { return members.map((m) => m.clientUrl) },
    kill: async (i) => { await stopProcess((members[i] as EtcdMember).proc, 'SIGKILL') },
    restart: async (i) => { launch(members[i] as EtcdMember); await healthy() },
    pause: (i) => { members[i]?.proc?.kill('SIGSTOP') },
    resume: (i) => { members[i]?.proc?.kill('SIGCONT') },
    stop: async () => {
      for (const m of members) m.proc?.kill('SIGCONT')
      await Promise.all(members.map(async (m) => { await stopProcess(m.proc) }))
    }
  }
  t.teardown(async () => {
    await cluster.stop()
    rmSync(root, { recursive: true, force: true })
  })
  if (options.start !== false) {
    // A port taken between freePort() and etcd's bind: new ports, start again.
    for (let attempt = 1; ; attempt++) {
      for (const m of members) launch(m)
      try {
        await healthy()
        break
      } catch (err) {
        if (!clashed() || attempt === 3) throw err
        await cluster.stop()
        await placePorts()
      }
    }
  }
  return cluster
}
