/**
 * Does the local app accept connections? With nothing listening on the app's port every
 * request is a 502 while `/health` rightly says this sidecar is fine; this says why, at start
 * and whenever it changes: a `warn` log line and an entry in `/ready`'s `warnings` (which never
 * fails readiness: the sidecar cannot fix the app, and a pod whose app starts a little after
 * its sidecar is normal).
 *
 * Watched: `critical` upstreams and upstreams with an endpoint on a loopback address (the app
 * beside this sidecar). Each endpoint gets one TCP connect when first seen; after that its pool
 * reports on real traffic — a failed connect marks it unreachable (a failed TLS handshake does
 * not: the app accepted the connection), a connect reachable again.
 * Only while an endpoint is unreachable is it probed again, every second, so a healthy app sees
 * no traffic from this but its own requests' connections.
 */
import net from 'node:net'
import type { Logger } from 'pino'
import type { Upstream } from '../proxy/upstreams.js'
import type { Endpoint } from '../proxy/balancer.js'

/** How often an unreachable endpoint is probed again. */
const RETRY_MS = 1000

/**
 * Pool connect errors that mean no connection was made. Any other (a TLS handshake refused: an
 * untrusted certificate, a name mismatch, a client certificate the app wants) came from an app
 * that did accept the connection; calling it unreachable would send the on-call to the wrong
 * fault, and the next probe's connect would clear it again (a warn and an info line a second).
 */
const NOT_CONNECTED = new Set(['ECONNREFUSED', 'ETIMEDOUT', 'UND_ERR_CONNECT_TIMEOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EHOSTDOWN', 'ENETDOWN', 'EADDRNOTAVAIL', 'ENOTFOUND', 'EAI_AGAIN'])

/** An endpoint that does not accept connections, as `/ready` shows it. */
export interface ReachabilityWarning {
  upstream: string
  endpoint: string
  /** The connect error's code (`ECONNREFUSED`, `UND_ERR_CONNECT_TIMEOUT`, …). */
  error: string
  message: string
  since: string
}

interface Watched {
  upstream: string
  origin: string
  connectTimeoutMs: number
  reachable: boolean | null
  warning: ReachabilityWarning | null
  timer: NodeJS.Timeout | null
  socket: net.Socket | null
}

/** True for a host on this machine: the app a sidecar runs beside. */
function isLoopback (hostname: string): boolean {
  const h = hostname.replace(/^\[|\]$/g, '').toLowerCase()
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h)
}

export class ReachabilityWatch {
  private readonly watched = new Map<string, Watched>()
  private readonly subscribed = new WeakSet<Endpoint>()
  private stopped = false

  constructor (private readonly logger: Logger) {}

  /** Watch the local app's endpoints among `upstreams` (at start and after each reload). */
  watch (upstreams: Iterable<Upstream>): void {
    this.stopped = false
    const current = new Set<string>()
    for (const u of upstreams) {
      const local = u.config.critical || u.balancer.endpoints.some((e) => isLoopback(new URL(e.origin).hostname))
      if (!local) continue
      for (const endpoint of u.balancer.endpoints) {
        const key = `${u.name} ${endpoint.origin}`
        current.add(key)
        if (!this.subscribed.has(endpoint)) {
          this.subscribed.add(endpoint)
          endpoint.pool.on('connect', () => this.markReachable(key))
          endpoint.pool.on('connectionError', (_origin, _targets, err: Error) => {
            if (NOT_CONNECTED.has((err as NodeJS.ErrnoException).code ?? '')) this.markUnreachable(key, err)
          })
        }
        let w = this.watched.get(key)
        if (w === undefined) {
          w = { upstream: u.name, origin: endpoint.origin, connectTimeoutMs: u.config.connectTimeoutMs, reachable: null, warning: null, timer: null, socket: null }
          this.watched.set(key, w)
          this.probe(w, key)
        }
        w.connectTimeoutMs = u.config.connectTimeoutMs
      }
    }
    for (const [key, w] of this.watched) {
      if (current.has(key)) continue
      this.cancel(w)
      this.watched.delete(key)
    }
  }

  /** Endpoints of the local app that do not accept connections now. */
  warnings (): ReachabilityWarning[] {
    const out: ReachabilityWarning[] = []
    for (const w of this.watched.values()) if (w.warning !== null) out.push(w.warning)
    return out
  }

  /** Unreachable endpoints by watched upstream (0 when all accept connections), for metrics. */
  unreachable (): Map<string, number> {
    const out = new Map<string, number>()
    for (const w of this.watched.values()) out.set(w.upstream, (out.get(w.upstream) ?? 0) + (w.warning === null ? 0 : 1))
    return out
  }

  stop (): void {
    this.stopped = true
    for (const w of this.watched.values()) this.cancel(w)
    this.watched.clear()
  }

  private cancel (w: Watched): void {
    if (w.timer !== null) clearTimeout(w.timer)
    w.timer = null
    w.socket?.destroy()
    w.socket = null
  }

  private probe (w: Watched, key: string): void {
    if (this.stopped) return
    const url = new URL(w.origin)
    const port = url.port !== '' ? Number(url.port) : url.protocol === 'https:' ? 443 : 80
    const socket = net.connect({ host: url.hostname.replace(/^\[|\]$/g, ''), port })
    w.socket = socket
    socket.setTimeout(w.connectTimeoutMs)
    const settle = (err: Error | null): void => {
      socket.destroy()
      if (w.socket !== socket) return // cancelled
      w.socket = null
      if (err === null) this.markReachable(key)
      else this.markUnreachable(key, err)
    }
    socket.once('connect', () => settle(null))
    socket.once('timeout', () => settle(Object.assign(new Error(`no connection within ${w.connectTimeoutMs} ms`), { code: 'ETIMEDOUT' })))
    socket.once('error', settle)
  }

  private markReachable (key: string): void {
    const w = this.watched.get(key)
    if (w === undefined || this.stopped) return
    const was = w.reachable
    w.reachable = true
    w.warning = null
    this.cancel(w)
    if (was === false) this.logger.info({ event: 'upstream_reachable', upstream: w.upstream, endpoint: w.origin }, 'upstream accepts connections again')
  }

  private markUnreachable (key: string, err: Error): void {
    const w = this.watched.get(key)
    if (w === undefined || this.stopped) return
    const code = (err as NodeJS.ErrnoException).code ?? err.name
    if (w.reachable !== false) {
      w.reachable = false
      const message = `upstream ${w.upstream} (${w.origin}) does not accept connections: ${code}`
      w.warning = { upstream: w.upstream, endpoint: w.origin, error: code, message, since: new Date().toISOString() }
      this.logger.warn({ event: 'upstream_unreachable', upstream: w.upstream, endpoint: w.origin, error: code }, 'upstream does not accept connections; requests to it fail with 502')
    }
    if (w.timer === null && w.socket === null) {
      w.timer = setTimeout(() => { w.timer = null; this.probe(w, key) }, RETRY_MS)
      w.timer.unref()
    }
  }
}
