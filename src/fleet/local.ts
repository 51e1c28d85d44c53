/**
 * A real etcd cluster and a real Alertmanager on loopback ports, in temp dirs, for the fleet
 * drill (`breakwater drill --fleet`): each binary is the one a user installs (Debian packages
 * `etcd-server` and `prometheus-alertmanager`), started on a free port (retried on a clash)
 * and stopped with SIGTERM, then SIGKILL.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Agent, request } from '../undici.js'
import { stringify } from 'yaml'

export const ETCD_MISSING = 'etcd not found: install it with `apt-get install -y etcd-server`'
export const ALERTMANAGER_MISSING = 'alertmanager not found: install it with `apt-get install -y prometheus-alertmanager`'

/**
 * Where the kernel takes ports for outgoing connections and for listeners on port 0:
 * /proc/sys/net/ipv4/ip_local_port_range on Linux, else the IANA range.
 */
function ephemeralPorts (): { low: number, high: number } {
  try {
    const [low, high] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number)
    if (Number.isInteger(low) && Number.isInteger(high)) return { low: low as number, high: high as number }
  } catch {}
  return { low: 49152, high: 65535 }
}

/** The port a listener got on 127.0.0.1 for `port` (0: any), closed again at once; null when it could not bind. */
async function listenOnce (port: number): Promise<number | null> {
  return await new Promise((resolve) => {
    const server = createServer()
    server.once('error', () => { resolve(null) })
    server.listen(port, '127.0.0.1', () => {
      const address = server.address()
      const bound = typeof address === 'object' && address !== null ? address.port : null
      server.close(() => { resolve(bound) })
    })
  })
}

/**
 * A port nobody listens on right now, for a server that binds it later (etcd is given its ports
 * on the command line, and a member that is down keeps them for its restart). Taken below the
 * kernel's ephemeral range where there is room: a port from that range (a listen on port 0) can
 * meanwhile become the local port of any outgoing connection or another port-0 listener on the
 * host, and the server's bind then fails with EADDRINUSE.
 */
export async function freePort (): Promise<number> {
  const { low } = ephemeralPorts()
  // Above the ports well-known services tend to use; below the kernel's.
  const floor = 10_000
  if (low - floor >= 1000) {
    for (let tries = 0; tries < 50; tries++) {
      const port = await listenOnce(floor + Math.floor(Math.random() * (low - floor)))
      if (port !== null) return port
    }
  }
  const port = await listenOnce(0)
  if (port === null) throw new Error('no free port on 127.0.0.1')
  return port
}

/** `signal` (SIGTERM), then SIGKILL after 5 s; resolves once the process is gone. */
export async function stopProcess (proc: ChildProcess | null, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (proc === null || proc.exitCode !== null || proc.signalCode !== null) return
  const exited = new Promise<void>((resolve) => proc.once('exit', () => { resolve() }))
  proc.kill('SIGCONT')
  proc.kill(signal)
  const timer = setTimeout(() => proc.kill('SIGKILL'), 5000)
  await exited
  clearTimeout(timer)
}

/** Poll `check` every 50 ms until it holds or `timeoutMs` passes. */
async function until (check: () => Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return true
    if (Date.now() > deadline) return false
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

export interface EtcdMember {
  name: string
  clientUrl: string
  peerUrl: string
  dataDir: string
  proc: ChildProcess | null
  /** The end of what it printed (for error messages). */
  output: string
}

export interface LocalEtcd {
  members: EtcdMember[]
  readonly endpoints: string[]
  /** Kill one member (SIGKILL: it dies as a crashed node does). */
  kill: (i: number) => Promise<void>
  /** Start a member (again) on its ports and data dir; resolves once every running member is healthy. */
  restart: (i: number) => Promise<void>
  /** Freeze / thaw a member (SIGSTOP / SIGCONT): it keeps its connections but answers nothing. */
  pause: (i: number) => void
  resume: (i: number) => void
  /** Stop every member and remove the data dirs. */
  close: () => Promise<void>
}

export interface LocalEtcdOptions {
  /** Lay the cluster out (ports, dirs) without starting it. */
  start?: boolean
  /**
   * Serve clients over TLS only, with this certificate, requiring client certificates the CA signed.
   * It must allow client authentication too: etcd's own HTTP gateway, and the health checks, present it.
   */
  tls?: { cert: string, key: string, ca: string }
  /** More flags for every member (`--auth-token-ttl`, …). */
  args?: readonly string[]
}

/** An etcd cluster of `size` members; with `start: false` laid out (ports, dirs) but not started. */
export async function startLocalEtcd (size: number, options: LocalEtcdOptions = {}): Promise<LocalEtcd> {
  const tls = options.tls
  // The health checks present the client certificate too when clients must (etcd --client-cert-auth).
  const health = tls === undefined ? null : new Agent({ connect: { ca: readFileSync(tls.ca), cert: readFileSync(tls.cert), key: readFileSync(tls.key) } })
  const root = mkdtempSync(join(tmpdir(), 'breakwater-etcd-'))
  const members: EtcdMember[] = []
  for (let i = 0; i < size; i++) members.push({ name: `m${i}`, clientUrl: '', peerUrl: '', dataDir: join(root, `m${i}`), proc: null, output: '' })
  const placePorts = async (): Promise<void> => {
    for (const m of members) {
      m.clientUrl = `${tls === undefined ? 'http' : 'https'}://127.0.0.1:${await freePort()}`
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
      '--initial-cluster-token', 'breakwater-local',
      '--heartbeat-interval', '100',
      '--election-timeout', '1000',
      '--logger', 'zap',
      '--log-level', 'warn',
      ...(tls === undefined ? [] : ['--cert-file', tls.cert, '--key-file', tls.key, '--trusted-ca-file', tls.ca, '--client-cert-auth']),
      ...(options.args ?? [])
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
    const ok = await until(async () => {
      if (clashed() || members.some((m) => m.output.includes(ETCD_MISSING))) return true
      for (const m of members) {
        if (m.proc === null) continue
        const body = await (health === null
          ? fetch(`${m.clientUrl}/health`).then(async (res) => await res.json())
          : request(`${m.clientUrl}/health`, { dispatcher: health }).then(async (res) => await res.body.json())
        ).catch(() => null) as { health?: string } | null
        if (body?.health !== 'true') return false
      }
      return true
    }, 60_000)
    if (members.some((m) => m.output.includes(ETCD_MISSING))) throw new Error(ETCD_MISSING)
    if (!ok || clashed()) throw new Error(`etcd not healthy: ${members.map((m) => `${m.name}: ${m.proc === null ? 'exited' : 'running'} ${m.output.slice(-600)}`).join(' | ')}`)
  }
  const stopAll = async (): Promise<void> => {
    await Promise.all(members.map(async (m) => { await stopProcess(m.proc) }))
  }
  const etcd: LocalEtcd = {
    members,
    get endpoints () { return members.map((m) => m.clientUrl) },
    kill: async (i) => { await stopProcess(members[i]?.proc ?? null, 'SIGKILL') },
    restart: async (i) => { launch(members[i] as EtcdMember); await healthy() },
    pause: (i) => { members[i]?.proc?.kill('SIGSTOP') },
    resume: (i) => { members[i]?.proc?.kill('SIGCONT') },
    close: async () => {
      await stopAll()
      await health?.close()
      rmSync(root, { recursive: true, force: true })
    }
  }
  if (options.start === false) return etcd
  // A port taken between freePort() and etcd's bind: new ports, start again.
  for (let attempt = 1; ; attempt++) {
    for (const m of members) launch(m)
    try {
      await healthy()
      return etcd
    } catch (err) {
      await stopAll()
      if (!clashed() || attempt === 3) {
        await health?.close()
        rmSync(root, { recursive: true, force: true })
        throw err
      }
      await placePorts()
    }
  }
}

export interface LocalAlertmanager {
  url: string
  proc: ChildProcess
  close: () => Promise<void>
}

/** The Alertmanager binary's name on this machine: Debian's, or upstream's. */
function alertmanagerBinary (): string {
  for (const name of ['prometheus-alertmanager', 'alertmanager']) {
    if (spawnSync(name, ['--version']).error === undefined) return name
  }
  throw new Error(ALERTMANAGER_MISSING)
}

/**
 * An Alertmanager that routes every alert to `webhookUrl` (resolutions too), grouping by
 * `alertname, service, trigger`; `route` overrides the route's timings, `global` sets Alertmanager's
 * global settings (`resolve_timeout`).
 */
export async function startLocalAlertmanager (webhookUrl: string, route: Record<string, unknown> = {}, global: Record<string, unknown> = {}): Promise<LocalAlertmanager> {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-am-'))
  writeFileSync(join(dir, 'alertmanager.yml'), stringify({
    ...(Object.keys(global).length > 0 ? { global } : {}),
    route: { receiver: 'hook', group_by: ['alertname', 'service', 'trigger'], group_wait: '3s', group_interval: '2s', repeat_interval: '1h', ...route },
    receivers: [{ name: 'hook', webhook_configs: [{ url: webhookUrl, send_resolved: true }] }]
  }))
  let name: string
  try {
    name = alertmanagerBinary()
  } catch (err) {
    rmSync(dir, { recursive: true, force: true })
    throw err
  }
  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    let output = ''
    const proc = spawn(name, [
      `--config.file=${join(dir, 'alertmanager.yml')}`,
      `--storage.path=${join(dir, 'data')}`,
      `--web.listen-address=127.0.0.1:${port}`,
      '--cluster.listen-address=',
      '--log.level=warn'
    ], { stdio: ['ignore', 'pipe', 'pipe'] })
    proc.stdout.on('data', (c: Buffer) => { output = (output + c.toString('utf8')).slice(-4000) })
    proc.stderr.on('data', (c: Buffer) => { output = (output + c.toString('utf8')).slice(-4000) })
    const url = `http://127.0.0.1:${port}`
    const ready = await until(async () => {
      if (proc.exitCode !== null) return true
      const res = await fetch(`${url}/-/ready`).catch(() => null)
      return res?.status === 200
    }, 30_000)
    if (ready && proc.exitCode === null) {
      return { url, proc, close: async () => { await stopProcess(proc); rmSync(dir, { recursive: true, force: true }) } }
    }
    await stopProcess(proc)
    if (!/address already in use/.test(output) || attempt === 3) {
      rmSync(dir, { recursive: true, force: true })
      throw new Error(`alertmanager did not become ready: ${output}`)
    }
  }
}
