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
import { Pool } from 'undici'
import type { CircuitBreakerConfig, UpstreamConfig } from '../config/types.js'
import { Balancer, Endpoint, type BalancerEvents } from './balancer.js'
import type { Circuit } from './circuit-breaker.js'

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

  constructor (config: UpstreamConfig, endpoints: Endpoint[], events: BalancerEvents, definition: string) {
    this.name = config.name
    this.config = config
    this.balancer = new Balancer(config, endpoints, events)
    this.definition = definition
  }

  /** False when active health checks fail for every endpoint. */
  get healthy (): boolean {
    for (const e of this.balancer.endpoints) if (e.healthy) return true
    return false
  }
}

function createPool (origin: string, config: UpstreamConfig): Pool {
  return new Pool(origin, {
    connections: config.connections,
    pipelining: 1,
    keepAliveTimeout: config.keepAliveTimeoutMs,
    // Never keep a connection longer than we intend to, whatever the upstream hints:
    // upstream keep-alive stays under the app's (SPEC §14).
    keepAliveMaxTimeout: config.keepAliveTimeoutMs,
    connect: { timeout: config.connectTimeoutMs }
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
        next.set(config.name, new Upstream(config, config.endpoints.map((origin) => new Endpoint(origin, createPool(origin, config))), events, definition))
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
    for (const e of upstream.balancer.endpoints) {
      this.closing.add(e)
      e.pool.close().catch(() => {}).finally(() => this.closing.delete(e))
    }
  }

  /** Every endpoint of the current upstreams. */
  all (): Endpoint[] {
    const out: Endpoint[] = []
    for (const u of this.current.values()) out.push(...u.balancer.endpoints)
    return out
  }

  /** Every pool still open, retired ones included: what a shutdown must close. */
  async destroy (): Promise<void> {
    await Promise.all([...this.all(), ...this.closing].map(async (e) => await e.pool.destroy().catch(() => {})))
  }

  async close (): Promise<void> {
    await Promise.all([...this.all(), ...this.closing].map(async (e) => await e.pool.close().catch(() => {})))
  }
}
