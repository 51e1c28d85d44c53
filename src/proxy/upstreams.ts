/**
 * The upstream set: one keep-alive undici `Pool` per endpoint, a balancer per upstream.
 *
 * A reload keeps what is running (SPEC §15). An upstream whose definition — its `upstreams`
 * entry and its `circuitBreakers` entry — is unchanged keeps its `Upstream` object whole: its
 * pools and warm connections, its bulkhead count of requests in flight, its endpoints'
 * ejection and health state. A changed upstream starts fresh, as Envoy builds a new cluster
 * for a changed definition; the upstream it replaces, like one a reload removed, is retired:
 * its pools close once the requests still running on them finish.
 */
import { Client, Pool } from '../undici.js'
import type { CircuitBreakerConfig, UpstreamConfig } from '../config/types.js'
import { Balancer, Endpoint, type BalancerEvents } from './balancer.js'
import type { Circuit } from './circuit-breaker.js'
import type { Failover } from './failover.js'
import { upstreamConnect, type UpstreamCertificates } from './tls.js'
import type { Logger } from 'pino'

export class Upstream {
  readonly name: string
  readonly config: UpstreamConfig
  readonly balancer: Balancer
  /** What the upstream was built from, for telling an unchanged one on reload. */
  readonly definition: string
  /** Requests in flight to this upstream (the bulkhead's count). */
  inFlight = 0
  /** Its circuit breaker, when `circuitBreakers` lists it (or an operator forced one). */
  circuit: Circuit | null = null
  /**
   * Exchanges holding a pooled connection while they wait on their client: an upload too
   * large to buffer, or a response the client stopped reading (`forward.ts`).
   */
  held = 0
  /**
   * Half of the upstream's pooled connections: past it, a client waited on gets a short grace
   * instead of `idleTimeoutMs` (`forward.ts`), so stalled clients can never take them all.
   */
  readonly maxHeld: number
  /** Where its traffic goes while it is unavailable (SPEC §17); null = nowhere else. */
  failover: Failover | null = null
  /** undici's `connect` (options, or a connector that follows rotated certificate files). */
  readonly connect: ConnectOption
  /** An `https://` upstream's watched CA and client certificate; null for plain http. */
  readonly certificates: UpstreamCertificates | null

  constructor (config: UpstreamConfig, events: BalancerEvents, definition: string, logger: Logger) {
    this.name = config.name
    this.config = config
    const { connect, certificates } = upstreamConnect(config, logger)
    this.connect = connect
    this.certificates = certificates
    const endpoints = config.endpoints.map((origin) => watched(new Endpoint(origin, createPool(origin, config, connect))))
    this.balancer = new Balancer(config, endpoints, events)
    this.definition = definition
    this.maxHeld = Math.max(1, Math.floor(config.connections * endpoints.length / 2))
    certificates?.start()
  }

  /** False when active health checks fail for every endpoint. */
  get healthy (): boolean {
    for (const e of this.balancer.endpoints) if (e.healthy) return true
    return false
  }
}

type ConnectOption = ReturnType<typeof upstreamConnect>['connect']

function createPool (origin: string, config: UpstreamConfig, connect: ConnectOption): Pool {
  return new Pool(origin, {
    connections: config.connections,
    pipelining: 1,
    keepAliveTimeout: config.keepAliveTimeoutMs,
    // Never keep a connection longer than we intend to, whatever the upstream hints:
    // upstream keep-alive stays under the app's (SPEC §14).
    keepAliveMaxTimeout: config.keepAliveTimeoutMs,
    connect
  })
}

/** What the last build did with each upstream, by name (for the reload's log line). */
export interface UpstreamChanges {
  /** Unchanged: pools, circuit and bulkhead count carried over. */
  kept: string[]
  /** New or changed: built afresh. */
  fresh: string[]
  removed: string[]
}

/** Keeps unchanged upstreams (and their pools) across reloads; retires the others. */
export class UpstreamRegistry {
  private current = new Map<string, Upstream>()
  changes: UpstreamChanges = { kept: [], fresh: [], removed: [] }
  /** Endpoints of retired upstreams whose pools are still finishing their requests. */
  private readonly closing = new Set<Endpoint>()

  constructor (private readonly logger: Logger) {}

  /**
   * The upstreams for a new config. Unchanged ones are the running objects; the pools of
   * the ones left behind close after their in-flight requests.
   */
  build (configs: Readonly<Record<string, UpstreamConfig>>, breakers: Readonly<Record<string, CircuitBreakerConfig>>, events: BalancerEvents): Map<string, Upstream> {
    const next = new Map<string, Upstream>()
    const changes: UpstreamChanges = { kept: [], fresh: [], removed: [] }
    for (const config of Object.values(configs)) {
      const definition = JSON.stringify([config, breakers[config.name] ?? null])
      const prev = this.current.get(config.name)
      if (prev !== undefined && prev.definition === definition) {
        next.set(config.name, prev)
        changes.kept.push(config.name)
      } else {
        next.set(config.name, new Upstream(config, events, definition, this.logger))
        changes.fresh.push(config.name)
      }
    }
    for (const [name, prev] of this.current) {
      if (next.get(name) === prev) continue
      this.retire(prev)
      if (!next.has(name)) changes.removed.push(name)
    }
    this.current = next
    this.changes = changes
    return next
  }

  private retire (upstream: Upstream): void {
    upstream.certificates?.stop()
    for (const e of upstream.balancer.endpoints) {
      this.closing.add(e)
      e.pool.close().catch(() => {}).finally(() => this.closing.delete(e))
    }
  }

  private stopWatching (): void {
    for (const u of this.current.values()) u.certificates?.stop()
  }

  /** Every endpoint of the current upstreams. */
  all (): Endpoint[] {
    const out: Endpoint[] = []
    for (const u of this.current.values()) out.push(...u.balancer.endpoints)
    return out
  }

  /** Every pool still open, retired ones included: what a shutdown must close. */
  async destroy (): Promise<void> {
    this.stopWatching()
    await Promise.all([...this.all(), ...this.closing].map(async (e) => await e.pool.destroy().catch(() => {})))
  }

  async close (): Promise<void> {
    this.stopWatching()
    await Promise.all([...this.all(), ...this.closing].map(async (e) => await e.pool.close().catch(() => {})))
  }
}

/**
 * How long after the upstream last closed a pooled connection on its own that its pooled
 * connections are not trusted with a request that cannot be retried.
 */
const PEER_CLOSE_MEMORY_MS = 60_000

/** Errors with which undici reports a connection the upstream closed or reset (not one we closed). */
function closedByPeer (err: unknown): boolean {
  const code = (err as { code?: string } | null)?.code
  return code === 'UND_ERR_SOCKET' || code === 'ECONNRESET' || code === 'EPIPE'
}

function watched (endpoint: Endpoint): Endpoint {
  endpoint.pool.on('disconnect', (_origin, _targets, err) => {
    if (closedByPeer(err)) endpoint.peerClosedAt = performance.now()
  })
  return endpoint
}

/**
 * The keep-alive race (SPEC §14): an upstream may close a pooled connection just as we send
 * on it, and a request written on it cannot be proven unsent — undici validates an idle socket
 * before reuse, so a close that already arrived re-queues the request, but one that crosses
 * our write fails it after the bytes left. Idempotent requests are retried (`forward.ts`);
 * a non-idempotent one must not run that risk: while its upstream has lately been closing
 * pooled connections on its own (an app keep-alive shorter than `keepAliveTimeoutMs`, or one
 * that closes right after answering without saying so), it goes on a fresh connection.
 */
export function reusable (endpoint: Endpoint, now: number): boolean {
  return now - endpoint.peerClosedAt > PEER_CLOSE_MEMORY_MS
}

/** A connection of its own for one request (`reusable`, and retries after the race); close it once dispatched. */
export function freshConnection (endpoint: Endpoint, upstream: Upstream): Client {
  return new Client(endpoint.origin, { pipelining: 1, connect: upstream.connect })
}
