/**
 * The upstream set: one keep-alive undici `Pool` per endpoint, a balancer per upstream.
 * Pools outlive a config reload when the endpoint and its settings are unchanged, so a
 * SIGHUP does not drop a single warm connection.
 */
import { Pool } from 'undici'
import type { UpstreamConfig } from '../config/types.js'
import { Balancer, Endpoint, type BalancerEvents } from './balancer.js'
import type { Circuit } from './circuit-breaker.js'
import type { Failover } from './failover.js'

export class Upstream {
  readonly name: string
  readonly config: UpstreamConfig
  readonly balancer: Balancer
  /** Requests in flight to this upstream (the bulkhead's count). */
  inFlight = 0
  /** Its circuit breaker, when `circuitBreakers` lists it. */
  circuit: Circuit | null = null
  /** Where its traffic goes while it is unavailable (SPEC §17); null = nowhere else. */
  failover: Failover | null = null

  constructor (config: UpstreamConfig, endpoints: Endpoint[], events: BalancerEvents) {
    this.name = config.name
    this.config = config
    this.balancer = new Balancer(config, endpoints, events)
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
        const endpoint = next.get(key) ?? this.endpoints.get(key) ?? new Endpoint(origin, new Pool(origin, {
          connections: config.connections,
          pipelining: 1,
          keepAliveTimeout: config.keepAliveTimeoutMs,
          // Never keep a connection longer than we intend to, whatever the upstream hints:
          // upstream keep-alive stays under the app's (SPEC §14).
          keepAliveMaxTimeout: config.keepAliveTimeoutMs,
          connect: { timeout: config.connectTimeoutMs }
        }))
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
