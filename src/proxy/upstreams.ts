/**
 * The upstream set: one keep-alive undici `Pool` per endpoint, a balancer per upstream.
 * Pools outlive a config reload when the endpoint and its settings are unchanged, so a
 * SIGHUP does not drop a single warm connection.
 */
import { Client, Pool } from 'undici'
import type { UpstreamConfig } from '../config/types.js'
import { Balancer, Endpoint, type BalancerEvents } from './balancer.js'
import type { Circuit } from './circuit-breaker.js'

export class Upstream {
  readonly name: string
  readonly config: UpstreamConfig
  readonly balancer: Balancer
  /** Requests in flight to this upstream (the bulkhead's count). */
  inFlight = 0
  /** Its circuit breaker, when `circuitBreakers` lists it. */
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

  constructor (config: UpstreamConfig, endpoints: Endpoint[], events: BalancerEvents) {
    this.name = config.name
    this.config = config
    this.balancer = new Balancer(config, endpoints, events)
    this.maxHeld = Math.max(1, Math.floor(config.connections * endpoints.length / 2))
  }

  /** False when active health checks fail for every endpoint. */
  get healthy (): boolean {
    for (const e of this.balancer.endpoints) if (e.healthy) return true
    return false
  }
}

function poolKey (origin: string, c: UpstreamConfig): string {
  return `${origin}|${c.connections}|${c.connectTimeoutMs}|${c.keepAliveTimeoutMs}`
}

/** Keeps endpoints (and their pools) alive across reloads; closes the ones a reload removed. */
export class EndpointRegistry {
  private endpoints = new Map<string, Endpoint>()

  build (configs: Readonly<Record<string, UpstreamConfig>>, events: BalancerEvents): { upstreams: Map<string, Upstream>, retired: Endpoint[] } {
    const next = new Map<string, Endpoint>()
    const upstreams = new Map<string, Upstream>()
    for (const config of Object.values(configs)) {
      const endpoints = config.endpoints.map((origin) => {
        const key = `${config.name}|${poolKey(origin, config)}`
        const endpoint = next.get(key) ?? this.endpoints.get(key) ?? watched(new Endpoint(origin, new Pool(origin, {
          connections: config.connections,
          pipelining: 1,
          keepAliveTimeout: config.keepAliveTimeoutMs,
          // Never keep a connection longer than we intend to, whatever the upstream hints:
          // upstream keep-alive stays under the app's (SPEC §14).
          keepAliveMaxTimeout: config.keepAliveTimeoutMs,
          connect: { timeout: config.connectTimeoutMs }
        })))
        next.set(key, endpoint)
        return endpoint
      })
      upstreams.set(config.name, new Upstream(config, endpoints, events))
    }
    const retired = [...this.endpoints.entries()].filter(([key]) => !next.has(key)).map(([, e]) => e)
    this.endpoints = next
    return { upstreams, retired }
  }

  all (): Endpoint[] {
    return [...this.endpoints.values()]
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
export function freshConnection (endpoint: Endpoint, config: UpstreamConfig): Client {
  return new Client(endpoint.origin, { pipelining: 1, connect: { timeout: config.connectTimeoutMs } })
}
