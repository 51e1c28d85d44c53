/**
 * The data plane's state: the current runtime (route table and upstreams, swapped whole on a
 * reload), the shared counters, and the knobs the lifecycle turns (draining).
 */
import { randomBytes } from 'node:crypto'
import type { Duplex } from 'node:stream'
import type { Logger } from 'pino'
import type { RawLines } from '../log/lines.js'
import type { CircuitBreakerConfig, Config, Listener } from '../config/types.js'
import { Route, RouteTable } from './route-table.js'
import { UpstreamRegistry, type Upstream, type UpstreamChanges } from './upstreams.js'
import type { Endpoint } from './balancer.js'
import { DataPlaneStats } from './stats.js'
import { OverloadMonitor } from './overload.js'
import { Circuit, RotationClock, type CircuitState, type ForcedState } from './circuit-breaker.js'
import type { FlagReader } from './kill-switch.js'
import { RateLimits, TrustedProxies, type RateLimitSettings } from './rate-limit.js'
import { trustedBlockList } from '../config/rungs.js'
import { FailoverTable } from './failover.js'
import { Fallbacks } from './fallback.js'
import { SilenceWatch } from './silence.js'

/** Settings of a manual circuit; never used to decide anything (it has no breaker). */
const MANUAL_CIRCUIT = Object.freeze({ failureThreshold: 1, volumeThreshold: 1, rollingWindowMs: 10_000, recoveryTimeout: 30_000, maxConcurrentRequests: 0, failureStatuses: [] })

/** Everything derived from one config; replaced as a whole on reload. */
export interface Runtime {
  readonly config: Config
  readonly routes: RouteTable
  readonly upstreams: ReadonlyMap<string, Upstream>
}

export interface DataPlaneOptions {
  logger: Logger
  /** Where the access log writes its lines: the logger's destination, in order with its lines. */
  lines: RawLines
  /** The flag snapshot kill switches read. */
  flags: FlagReader
  stats?: DataPlaneStats
}

export class DataPlane {
  runtime: Runtime
  /**
   * Set once the proxy listener stops accepting (after `drainDelayMs`): its responses carry
   * `Connection: close` so clients move away. Never the egress listener's: it serves the app's
   * own calls to the end (SPEC §14), keep-alive included.
   */
  draining = false
  /**
   * Set at the shutdown deadline, as the sidecar cuts what still runs: a request that fails from
   * then on was cut by us (`shutdown_deadline`), not failed by its upstream.
   */
  cutting = false
  readonly stats: DataPlaneStats
  readonly logger: Logger
  readonly lines: RawLines
  readonly overload: OverloadMonitor
  readonly flags: FlagReader
  /** Circuits by upstream; kept across reloads when their settings are unchanged. */
  private circuits = new Map<string, Circuit>()
  private readonly clock = new RotationClock()
  /** Circuit transitions, by upstream and state (for metrics). */
  readonly transitions = new Map<string, number>()
  accessLogRate = 1
  /**
   * A verification probe (`x-breakwater-synthetic: INCIDENT`) on `route` ended at `atMs` (the
   * window clock, window.ts) with an
   * outcome the trigger windows would have counted; they did not (it is not users' traffic), and
   * the verifier says how many it left out.
   */
  onSynthetic: ((incident: string, route: string, atMs: number) => void) | null = null
  /**
   * What the verifier's probes carry in `x-breakwater-probe` (never forwarded): a client that
   * sends `x-breakwater-synthetic` without it is real traffic, counted as such.
   */
  readonly probeKey = randomBytes(16).toString('hex')
  /** Open WebSocket tunnels (client side), destroyed when the process finally stops. */
  readonly tunnels = new Set<Duplex>()
  /** Client silence of the exchanges in flight (`routes[].idleTimeoutMs`). */
  readonly silence = new SilenceWatch()
  maxInFlight = 0
  private readonly upstreams: UpstreamRegistry
  /** The routes of the current runtime, for finding unchanged ones on reload. */
  private routes: readonly Route[] = []
  private readonly idPrefix = `${randomBytes(6).toString('hex')}-`
  private idCounter = 0
  /** The missing rungs (SPEC §17): their state outlives a reload. */
  readonly rateLimits: RateLimits
  readonly failovers: FailoverTable
  private readonly fallbacks = new Fallbacks()
  /**
   * Each listener's `trustedProxies` (null: none), which name the client of the span and the
   * access line as they key a `client` rate limit. Listener settings change only at a restart.
   */
  readonly trustedProxies: Readonly<Record<Listener, TrustedProxies | null>>

  constructor (config: Config, options: DataPlaneOptions) {
    this.logger = options.logger
    this.lines = options.lines
    this.flags = options.flags
    this.stats = options.stats ?? new DataPlaneStats()
    this.overload = new OverloadMonitor(config.limits.maxEventLoopDelayMs)
    this.failovers = new FailoverTable(this.logger)
    this.upstreams = new UpstreamRegistry(this.logger)
    const proxy = trustedBlockList(config.listen.proxy.trustedProxies)
    const egress = trustedBlockList(config.listen.egress?.trustedProxies ?? [])
    this.trustedProxies = { proxy: proxy === null ? null : new TrustedProxies(proxy), egress: egress === null ? null : new TrustedProxies(egress) }
    this.rateLimits = new RateLimits(this.trustedProxies)
    this.runtime = this.build(config)
  }

  /** Request ids: a random per-process prefix and a counter (cheap, unique across a fleet). */
  newRequestId = (): string => this.idPrefix + (this.idCounter++).toString(36)

  /**
   * Everything derived from `config`, keeping what is running (SPEC §15): unchanged upstreams
   * keep their pools, bulkhead counts and circuits (see `UpstreamRegistry`); a changed one
   * gets a fresh circuit that keeps only an operator's forced state; unchanged routes keep
   * their retry budgets; route stats and trigger windows follow the route's name and upstream,
   * and those of routes a reload removed are freed.
   */
  private build (config: Config): Runtime {
    const upstreams = this.upstreams.build(config.upstreams, config.circuitBreakers, {
      onEject: (upstream, endpoint, penaltyMs) => {
        this.stats.ejection(upstream)
        this.logger.warn({ event: 'endpoint_ejected', upstream, endpoint: endpoint.origin, penaltyMs, consecutiveFailures: endpoint.consecutiveFailures }, 'endpoint ejected')
      }
    })
    const circuits = new Map<string, Circuit>()
    for (const [name, upstream] of upstreams) {
      const prev = this.circuits.get(name)
      const circuit = upstream.circuit === prev && prev !== undefined ? prev : this.circuitFor(name, config.circuitBreakers[name], prev)
      if (circuit === null) continue
      circuits.set(name, circuit)
      upstream.circuit = circuit
    }
    for (const [name, prev] of this.circuits) {
      const next = circuits.get(name)
      if (next === prev) continue
      // An open (or half-open) breaker replaced by a closed one is a transition like any other:
      // logged and counted, or the last line says "open" while traffic floods the upstream.
      if (prev.automatic && prev.automaticState !== 'closed' && (next === undefined || !next.automatic || next.automaticState === 'closed')) this.closedByReload(name, prev, next)
      prev.shutdown()
    }
    this.circuits = circuits
    const previous = new Map<string, Route>()
    for (const r of this.routes) previous.set(r.name, r)
    const routes = config.routes.map((r) => {
      const upstream = upstreams.get(r.upstream) as Upstream
      const prev = previous.get(r.name)
      if (prev !== undefined && prev.upstream === upstream && JSON.stringify(prev.config) === JSON.stringify(r)) return prev
      return new Route(r, upstream, this.stats.route(r.name, r.upstream))
    })
    this.routes = routes
    this.stats.retain(routes.map((r) => r.stats))
    this.rateLimits.attach(routes)
    this.fallbacks.attach(routes)
    this.failovers.attach(upstreams)
    this.accessLogRate = config.logging.accessLogRate
    this.maxInFlight = config.limits.maxInFlight
    this.overload.maxDelayMs = config.limits.maxEventLoopDelayMs
    return { config, routes: new RouteTable(routes, this.flags), upstreams }
  }

  /**
   * The circuit of a new or changed upstream: a fresh breaker when `circuitBreakers` lists
   * it, else a manual circuit while an operator's forced state must survive, else none. An
   * operator's forced state carries over either way: a reload never lifts a mitigation.
   */
  private circuitFor (upstream: string, settings: CircuitBreakerConfig | undefined, prev: Circuit | undefined): Circuit | null {
    const forced = prev?.forced ?? null
    if (settings === undefined && forced === null) return null
    const circuit = settings === undefined
      ? new Circuit(upstream, MANUAL_CIRCUIT, this.clock, { onTransition: () => {} }, false)
      : new Circuit(upstream, settings, this.clock, { onTransition: (name, to) => this.onTransition(name, to) })
    circuit.forced = forced
    return circuit
  }

  private onTransition (upstream: string, to: CircuitState): void {
    const key = `${upstream}\u0000${to}`
    this.transitions.set(key, (this.transitions.get(key) ?? 0) + 1)
    const circuit = this.circuits.get(upstream)
    this.logger.warn({ event: `circuit_${to.replace('-', '_')}`, upstream, state: to, failureRate: circuit?.failureRate, forced: circuit?.forced ?? null }, `circuit ${to}`)
  }

  /** A reload replaced `prev`, open or half-open, with a closed breaker (`next`) or none. */
  private closedByReload (upstream: string, prev: Circuit, next: Circuit | undefined): void {
    const key = `${upstream}\u0000closed`
    this.transitions.set(key, (this.transitions.get(key) ?? 0) + 1)
    this.logger.warn({ event: 'circuit_closed', upstream, state: 'closed', from: prev.automaticState, cause: 'reload', forced: next?.forced ?? null }, 'circuit closed by a reload: its upstream or breaker settings changed')
  }

  circuit (upstream: string): Circuit | undefined {
    return this.circuits.get(upstream)
  }

  allCircuits (): IterableIterator<Circuit> {
    return this.circuits.values()
  }

  /**
   * Force a circuit open or closed, or hand it back (`null`); for the admin API. An upstream
   * without a breaker gets a manual circuit while forced (operators may isolate any
   * dependency), and none again once handed back. False for an unknown upstream.
   */
  force (upstream: string, state: ForcedState): boolean {
    const target = this.runtime.upstreams.get(upstream)
    if (target === undefined) return false
    let circuit = this.circuits.get(upstream)
    if (circuit === undefined) {
      if (state === null) return true
      circuit = new Circuit(upstream, MANUAL_CIRCUIT, this.clock, { onTransition: () => {} }, false)
      this.circuits.set(upstream, circuit)
      target.circuit = circuit
    }
    if (circuit.forced === state) return true
    const before = circuit.state
    circuit.forced = state
    if (state === null && !circuit.automatic) {
      this.circuits.delete(upstream)
      target.circuit = null
    }
    this.logger.warn({ event: 'circuit_forced', upstream, forced: state, before, after: circuit.state }, state === null ? 'circuit handed back to automatic' : `circuit forced ${state}`)
    return true
  }

  /**
   * The runtime `rateLimit` mitigation: override the route's configured limit (or give it one)
   * until cleared with `null`; kept across reloads. False for an unknown route (clearing never fails).
   */
  setRouteRateLimit (route: string, settings: RateLimitSettings | null): boolean {
    return this.rateLimits.override(route, settings)
  }

  /**
   * The `failover` mitigation: send `upstream`'s traffic to `to` (default: its configured
   * `failover`) until lifted with `null`; kept across reloads. False when an upstream is
   * unknown or there is no target.
   */
  forceFailover (upstream: string, to: string | null | undefined): boolean {
    return this.failovers.force(upstream, to)
  }

  /**
   * Swap in a new config. Requests in flight finish on the runtime they started with. Says
   * which upstreams kept their state, which start afresh and which were removed.
   */
  apply (config: Config): UpstreamChanges {
    this.runtime = this.build(config)
    return this.upstreams.changes
  }

  allEndpoints (): Endpoint[] {
    return this.upstreams.all()
  }

  async close (): Promise<void> {
    this.overload.stop()
    this.stopCircuits()
    await this.upstreams.close()
  }

  private stopCircuits (): void {
    this.silence.stop()
    for (const c of this.circuits.values()) c.shutdown()
    this.clock.stop()
  }

  async destroy (): Promise<void> {
    this.overload.stop()
    this.stopCircuits()
    for (const t of this.tunnels) t.destroy()
    await this.upstreams.destroy()
  }
}
