/**
 * The data plane's state: the current runtime (route table and upstreams, swapped whole on a
 * reload), the shared counters, and the knobs the lifecycle turns (draining).
 */
import { randomBytes } from 'node:crypto'
import type { Duplex } from 'node:stream'
import type { Logger } from 'pino'
import type { Config } from '../config/types.js'
import { Route, RouteTable } from './route-table.js'
import { EndpointRegistry, type Upstream } from './upstreams.js'
import type { Endpoint } from './balancer.js'
import { DataPlaneStats } from './stats.js'
import { OverloadMonitor } from './overload.js'

/** Everything derived from one config; replaced as a whole on reload. */
export interface Runtime {
  readonly config: Config
  readonly routes: RouteTable
  readonly upstreams: ReadonlyMap<string, Upstream>
}

export interface DataPlaneOptions {
  logger: Logger
  stats?: DataPlaneStats
}

export class DataPlane {
  runtime: Runtime
  /** Set at SIGTERM: responses carry `Connection: close` so clients move away. */
  draining = false
  readonly stats: DataPlaneStats
  readonly logger: Logger
  readonly overload: OverloadMonitor
  accessLogRate = 1
  /** Open WebSocket tunnels (client side), destroyed when the process finally stops. */
  readonly tunnels = new Set<Duplex>()
  maxInFlight = 0
  private readonly endpoints = new EndpointRegistry()
  private readonly idPrefix = `${randomBytes(6).toString('hex')}-`
  private idCounter = 0

  constructor (config: Config, options: DataPlaneOptions) {
    this.logger = options.logger
    this.stats = options.stats ?? new DataPlaneStats()
    this.overload = new OverloadMonitor(config.limits.maxEventLoopDelayMs)
    this.runtime = this.build(config).runtime
  }

  /** Request ids: a random per-process prefix and a counter (cheap, unique across a fleet). */
  newRequestId = (): string => this.idPrefix + (this.idCounter++).toString(36)

  private build (config: Config): { runtime: Runtime, retired: Endpoint[] } {
    const { upstreams, retired } = this.endpoints.build(config.upstreams, {
      onEject: (upstream, endpoint, penaltyMs) => {
        this.stats.ejection(upstream)
        this.logger.warn({ event: 'endpoint_ejected', upstream, endpoint: endpoint.origin, penaltyMs, consecutiveFailures: endpoint.consecutiveFailures }, 'endpoint ejected')
      }
    })
    const routes = config.routes.map((r) => {
      const upstream = upstreams.get(r.upstream) as Upstream
      return new Route(r, upstream, this.stats.route(r.name, r.upstream))
    })
    this.accessLogRate = config.logging.accessLogRate
    this.maxInFlight = config.limits.maxInFlight
    this.overload.maxDelayMs = config.limits.maxEventLoopDelayMs
    return { runtime: { config, routes: new RouteTable(routes), upstreams }, retired }
  }

  /** Swap in a new config. Requests in flight finish on the runtime they started with. */
  apply (config: Config): void {
    const { runtime, retired } = this.build(config)
    this.runtime = runtime
    // Retired pools finish their in-flight requests, then close.
    for (const e of retired) e.pool.close().catch(() => {})
  }

  allEndpoints (): Endpoint[] {
    return this.endpoints.all()
  }

  async close (): Promise<void> {
    this.overload.stop()
    await Promise.all(this.endpoints.all().map(async (e) => await e.pool.close().catch(() => {})))
  }

  async destroy (): Promise<void> {
    this.overload.stop()
    for (const t of this.tunnels) t.destroy()
    await Promise.all(this.endpoints.all().map(async (e) => await e.pool.destroy().catch(() => {})))
  }
}
