/**
 * Builds a running sidecar from a config: logger, data plane, listeners, health checks,
 * metrics. Used by `main.ts` for the real process and directly by tests (every port may be
 * 0). Owns reload and the graceful shutdown sequence; knows nothing of signals or exit codes.
 */
import { readFileSync } from 'node:fs'
import type { Socket } from 'node:net'
import type { IncomingMessage } from 'node:http'
import { Registry } from 'prom-client'
import type { DestinationStream, Logger } from 'pino'
import type { Config } from './config/types.js'
import { ConfigError } from './config/load.js'
import { loadCheckedConfig } from './flags/check.js'
import { createLogger } from './log/logger.js'
import { DataPlane } from './proxy/dataplane.js'
import type { UpstreamChanges } from './proxy/upstreams.js'
import { createProxyServer, listenProxy, stopAccepting, boundUrl, type ProxyServer } from './proxy/server.js'
import type { Tracing } from './proxy/trace.js'
import type { SpanQueue, TraceStats } from './ops/tracing.js'
import { HealthChecker } from './proxy/health-check.js'
import { hasUsableEndpoint } from './proxy/failover.js'
import { windowNowMs } from './proxy/window.js'
import { normalisePath } from './proxy/path.js'
import type { Route } from './proxy/route-table.js'
import { requestHead } from './proxy/headers.js'
import { HealthPolicy, type FleetWarning } from './ops/health.js'
import { ReachabilityWatch } from './ops/reachability.js'
import { createOpsServer } from './ops/server.js'
import { registerMetrics, registerFleetMetrics } from './ops/metrics.js'
import type { Claim, Fleet, Holding, Progress } from './fleet/fleet.js'
import { hostname } from 'node:os'
import { FlagSnapshot } from './flags/snapshot.js'
import { ControlPlane, type Actor, type CircuitView } from './control/control-plane.js'
import { createAdminServer } from './control/admin-api.js'
import { resolveAdminToken, writeAdminToken, isLoopback, TokenFileWatcher, type AdminToken } from './control/token.js'
import { lockStateDir, StateDirLocked, type StateLock } from './state/lock.js'
import { Notifier, incidentKey } from './control/notify.js'
import { furtherPage } from './control/status-page.js'
import { TriggerEngine, type TriggerAction } from './control/triggers.js'
import { createTriggerAction } from './control/respond.js'
import { Verifier, TTR_BUCKETS } from './control/verify.js'
import { triage, type TriageReport } from './control/triage.js'
import { buildReport, type IncidentReport } from './control/report.js'

/** Audit lines read for a post-mortem draft (newest first; the file is capped in size anyway). */
const AUDIT_READ = 10_000

export interface SidecarOptions {
  /** Where log lines go (tests); stdout, bounded, when omitted. */
  logDestination?: DestinationStream
  registry?: Registry
  /** The admin token from the environment (`BREAKWATER_ADMIN_TOKEN`), if set. */
  adminToken?: string
  /** Benchmarks only: the bare forwarding core, every stage but forward switched off. */
  bare?: boolean
  /** This sidecar's name in the fleet (default: `BREAKWATER_INSTANCE`, else the host name). */
  instance?: string
}

/** A start-up refusal with a message for the operator (exit 1). */
export class StartupError extends Error {}

export interface Addresses {
  proxy: string
  ops: string
  admin: string
  egress: string | null
}

export interface ReloadResult {
  ok: boolean
  problems: readonly string[]
  /** Refused because the sidecar is shutting down (the admin API's 409). */
  draining?: boolean
}

/**
 * What a reload leaves as it runs until the restart: the warn line's words, and what it names of
 * the new value (never a secret: fleet and tracing settings may hold credentials).
 */
const AT_RESTART: Record<'listen' | 'tracing' | 'fleet' | 'stateDir' | 'admin' | 'service', { what: string, fields?: (next: Config) => Record<string, unknown> }> = {
  listen: { what: 'listener changes take effect', fields: (next) => ({ listen: next.listen }) },
  tracing: { what: 'tracing changes take effect' },
  fleet: { what: 'fleet changes take effect' },
  stateDir: { what: 'stateDir changes take effect', fields: (next) => ({ stateDir: next.stateDir }) },
  admin: { what: 'admin settings change' },
  service: { what: 'a new service name takes effect', fields: (next) => ({ wanted: next.service }) }
}

export class Sidecar {
  config: Config
  readonly logger: Logger
  readonly registry: Registry
  readonly dataPlane: DataPlane
  readonly health: HealthPolicy
  readonly flags: FlagSnapshot
  addresses: Addresses = { proxy: '', ops: '', admin: '', egress: null }
  readonly control: ControlPlane
  readonly notifier: Notifier
  readonly triggers: TriggerEngine
  readonly verifier: Verifier
  /** The fleet layer, when `fleet` is configured (loaded on demand). */
  fleet: Fleet | null = null
  private readonly triggerAction: TriggerAction
  /** This sidecar's name in the fleet and in Alertmanager's `instance` label. */
  readonly instance: string
  adminToken: AdminToken | null = null
  /** Re-reads `admin.tokenFile` when it changes (set when the token comes from that file). */
  private tokenWatcher: TokenFileWatcher | null = null
  private stateLock: StateLock | null = null
  readonly startedAt = new Date().toISOString()
  private readonly healthChecker: HealthChecker
  private readonly reachability: ReachabilityWatch
  private readonly proxy: ProxyServer
  private readonly egress: ProxyServer | null
  private readonly ops: ReturnType<typeof createOpsServer>
  private readonly admin: ReturnType<typeof createAdminServer>
  private readonly options: SidecarOptions
  /** Write out every log line still held, synchronously (at exit). */
  readonly flushLog: () => void
  private readonly drainLog: (ms: number) => Promise<void>
  private readonly reloads = { ok: 0, failed: 0 }
  /** The data plane's view of tracing; its exporter is set once `listen` has loaded it. */
  private readonly tracing: Tracing = { exporter: null }
  private spanQueue: SpanQueue | null = null
  private readonly traceStats: TraceStats = { exported: 0, dropped: { queue_full: 0, export_failed: 0 } }
  private stopping: Promise<void> | null = null
  /** The reload running now, if any: the next one waits for it (`reload`). */
  private reloading: Promise<void> = Promise.resolve()
  /** Incident keys whose leader left before acting, as last seen, until a still-firing sidecar claims them (`takeOver`). */
  private readonly leftBy = new Map<string, Holding>()
  private forceStop: (() => void) | null = null

  constructor (config: Config, options: SidecarOptions = {}) {
    this.config = config
    this.options = options
    this.instance = options.instance ?? process.env.BREAKWATER_INSTANCE ?? hostname()
    const log = createLogger(config.logging.level, config.service, options.logDestination)
    this.logger = log.logger
    this.flushLog = log.flush
    this.drainLog = log.drain
    this.registry = options.registry ?? new Registry()
    this.flags = new FlagSnapshot(config, this.logger)
    this.dataPlane = new DataPlane(config, { logger: this.logger, lines: log.lines, flags: this.flags })
    this.reachability = new ReachabilityWatch(this.logger)
    this.health = new HealthPolicy(this.dataPlane, () => [...this.reachability.warnings(), ...this.fleetWarnings()])
    this.healthChecker = new HealthChecker(this.logger)
    const maxConnections = (): number => this.config.limits.maxConnections
    this.proxy = createProxyServer(this.dataPlane, config.listen.proxy, 'proxy', maxConnections, this.tracing, options.bare === true)
    this.egress = config.listen.egress === null ? null : createProxyServer(this.dataPlane, config.listen.egress, 'egress', maxConnections, this.tracing)
    this.ops = createOpsServer(this.health, this.registry)
    const dp = this.dataPlane
    const flags = this.flags
    this.control = new ControlPlane(() => this.config, {
      override: async (key, enabled) => { await flags.override(key, enabled) },
      defines: (key) => flags.defines(key),
      get values () { return flags.values },
      origin: (key) => flags.sources.resolve(key)?.origin ?? null
    }, {
      force: (upstream, state) => dp.force(upstream, state),
      circuits: () => [...dp.allCircuits()].map((c): CircuitView => ({ upstream: c.upstream, state: c.state, automaticState: c.automaticState, forced: c.forced, automatic: c.automatic, failureRate: c.failureRate, windowRequests: c.windowRequests })),
      upstreams: () => [...dp.runtime.upstreams.keys()],
      killSwitchFlags: () => [...new Set(dp.runtime.config.routes.map((r) => r.killSwitch).filter((k): k is string => k !== null))]
    }, this.logger)
    this.control.rungs.connect({
      forceFailover: (upstream, to) => dp.forceFailover(upstream, to),
      forcedFailoverTo: (upstream) => dp.failovers.forcedNow(upstream),
      setRouteRateLimit: (route, limit) => dp.setRouteRateLimit(route, limit),
      upstreams: () => [...dp.runtime.upstreams.keys()],
      failoverOf: (upstream) => dp.runtime.upstreams.get(upstream)?.config.failover ?? null,
      routes: () => dp.runtime.config.routes.map((r) => r.name)
    })
    this.notifier = new Notifier(() => this.config.notifications, this.logger)
    this.control.onMitigation = (kind, record) => {
      // A started rollback is announced once it ends (applied or failed).
      if (kind === 'started') return
      this.notifier.notify({
        kind: `mitigation_${kind}`,
        service: this.config.service,
        version: this.config.version,
        trigger: record.source.startsWith('trigger:') ? record.source.slice(8) : null,
        summary: `${record.action} ${kind}: ${record.targets.join(', ')} — ${kind === 'lifted' ? record.liftReason ?? '' : kind === 'failed' ? record.error ?? '' : record.reason}`,
        details: { id: record.id, action: record.action, targets: record.targets.join(', '), source: record.source, status: record.status },
        time: new Date().toISOString()
      })
    }
    this.triggerAction = createTriggerAction({
      config: () => this.config,
      control: this.control,
      notifier: this.notifier,
      triage: () => this.triageView(),
      claim: (trigger, incident) => this.fleet === null ? null : this.claimIncident(trigger.name, incident),
      announced: (trigger) => {
        this.fleet?.progress(this.incidentKeyOf(trigger.name), { announcedAt: new Date().toISOString() }).catch((err: unknown) => {
          this.logger.warn({ event: 'fleet_incident', trigger: trigger.name, error: (err as Error).message }, 'fleet: cannot record on the incident key that the incident was announced; a sidecar taking it over announces it again')
        })
      },
      announcedTo: (trigger, receiver) => {
        this.fleet?.progress(this.incidentKeyOf(trigger.name), { announcedTo: [receiver] }).catch((err: unknown) => {
          this.logger.warn({ event: 'fleet_incident', trigger: trigger.name, error: (err as Error).message }, 'fleet: cannot record on the incident key that a receiver took the announcement; a sidecar taking it over sends it that receiver again')
        })
      }
    })
    this.triggers = new TriggerEngine(() => dp.stats.allRoutes(), this.triggerAction, this.logger)
    this.triggers.configure(config.rollbackTriggers)
    // The route in force now (a reload swaps the table), by its config name.
    const liveRoute = (name: string): Route | undefined => dp.runtime.routes.routes.find((x) => x.name === name)
    this.verifier = new Verifier({
      config: () => this.config,
      proxy: () => reachable(this.addresses.proxy),
      // The probe reaches this very process's listener: there is no one else to authenticate,
      // and a private CA need not be in the trust store. A mutual-TLS listener is shown
      // `verification.clientCert`, else the listener's own pair (which it accepts when its CA
      // is the listener's `ca` and the certificate allows client authentication).
      proxyTls: () => {
        const tls = this.config.listen.proxy.tls
        if (tls === null) return null
        const pair = this.config.verification.clientCert ?? tls
        return { rejectUnauthorized: false, cert: readFileSync(pair.cert), key: readFileSync(pair.key) }
      },
      stats: () => dp.stats.allRoutes(),
      refusedByMitigation: (route) => {
        const r = liveRoute(route)
        if (r === undefined) return false
        const key = r.config.killSwitch
        return (key !== null && !flags.enabled(key)) || r.upstream.circuit?.forced === 'open'
      },
      routeRateLimit: (route) => {
        const limiter = liveRoute(route)?.rateLimiter ?? null
        return limiter !== null && limiter.config.key === 'route' ? limiter.config.requestsPerSecond : null
      },
      probeKey: () => this.dataPlane.probeKey,
      routeOf: (method, path, host) => {
        const normalised = normalisePath(path)
        const probeHost = host ?? new URL(this.addresses.proxy).host
        const headers = { host: probeHost, 'user-agent': 'breakwater-verify' }
        const head = requestHead(['host', probeHost, 'user-agent', 'breakwater-verify'], '127.0.0.1', 'http', () => 'verify')
        const r = normalised === null ? null : dp.runtime.routes.match(method, normalised, head, { headers } as unknown as IncomingMessage, 'proxy')
        return r === null ? null : { route: r.name }
      },
      notifier: this.notifier,
      logger: this.logger,
      persist: (entry) => { void this.control.journal.commit(this.control.state, entry) },
      triage: () => this.triageView() as unknown as TriageReport,
      leading: (incident) => this.fleet === null || incident.trigger === null ? true : this.fleet.leads(incidentKey(this.config.service, incident.version, incident.trigger)),
      progressed: (incident, change) => {
        // The fleet leader tells its followers (SPEC §16): they record it instead of escalating.
        if (this.fleet === null || incident.fleet?.role !== 'leader' || incident.trigger === null) return
        this.fleet.progress(this.incidentKeyOf(incident.trigger), change).catch((err: unknown) => {
          this.logger.warn({ event: 'fleet_incident', incident: incident.id, error: (err as Error).message }, 'fleet: could not tell the followers how the incident went')
        })
      }
    })
    this.triggers.onFire = (trigger, reading, at) => {
      const { incident, opened } = this.verifier.triggerFired(trigger, at, reading)
      return { id: incident.id, opened }
    }
    this.dataPlane.onSynthetic = (incident, route, atMs) => { this.verifier.probeEnded(incident, route, atMs) }
    // Restoration seen on this sidecar's own traffic ends its Alertmanager alert too.
    this.triggers.onRearm = (trigger) => {
      this.notifier.alertmanager.resolve(trigger.name)
      // An incident with no mitigation in force ends on the traffic, not never (verify.ts).
      this.verifier.signalCleared(trigger.name)
    }
    this.notifier.alertmanager.instance = this.instance
    const notifyMitigation = this.control.onMitigation
    this.control.onMitigation = (kind, record) => {
      notifyMitigation(kind, record)
      if (kind === 'applied') this.verifier.mitigated(record)
      else if (kind === 'started') this.verifier.mitigationStarted(record)
      else if (kind === 'lifted') this.verifier.mitigationLifted(record)
      else if (kind === 'failed') {
        const incident = this.verifier.mitigationFailed(record)
        // Its trigger re-armed while the mitigation ran: the signal cleared with none in force.
        const trigger = incident.trigger
        if (trigger !== null && this.triggers.status().find((s) => s.name === trigger)?.state === 'ok') this.verifier.signalCleared(trigger)
      }
    }
    this.admin = createAdminServer({
      control: this.control,
      token: () => this.adminToken?.token ?? '',
      state: () => this.stateView(),
      reload: async (actor) => await this.reload(actor),
      incidents: () => this.verifier.incidents,
      report: async (id) => await this.incidentReport(id),
      triage: () => this.triageView(),
      logger: this.logger
    })
    registerMetrics(this.registry, { dataPlane: this.dataPlane, reachability: this.reachability, flags: this.flags, control: this.control, triggers: this.triggers, notifier: this.notifier, verifier: this.verifier, restoreBuckets: TTR_BUCKETS, log: log.stats, reloads: this.reloads, tracing: config.tracing === null ? null : this.traceStats, tls: this.listeners().flatMap((l) => l.tlsStats ?? []) })
  }

  async listen (): Promise<Addresses> {
    const { listen } = this.config
    if (!isLoopback(listen.admin.host) && (this.options.adminToken ?? '') === '' && this.config.admin.tokenFile === null) {
      throw new StartupError(`listen.admin: ${listen.admin.host} is not a loopback address; set BREAKWATER_ADMIN_TOKEN or admin.tokenFile to expose the admin API`)
    }
    // One sidecar per state dir, before anything in it is read or written.
    await this.lockStateDir()
    // Flags first, then persisted overrides and forced circuits: no request may be served
    // before the kill switches that are in force are known.
    await this.flags.start(this.config)
    await this.control.start()
    if (this.config.tracing !== null) {
      // STYLE 18: only a sidecar configured to export spans loads OpenTelemetry.
      const { SpanQueue, loadEncoding } = await import('./ops/tracing.js')
      const encoding = await loadEncoding(this.config.tracing, this.config.version)
      this.spanQueue = new SpanQueue(this.config.tracing, encoding, this.traceStats, this.logger, this.config.version)
      this.tracing.exporter = this.spanQueue
    }
    // Incidents and status page incidents of an earlier run carry on (SPEC §19).
    this.notifier.statusPage.restore(this.control.state.statusPage)
    this.notifier.statusPage.onChange = (key, page) => {
      if (page === null) delete this.control.state.statusPage[key]
      else this.control.state.statusPage[key] = page
      void this.control.journal.commit(this.control.state, null)
      // The fleet's actor for the incident writes its page incident on the incident key (SPEC §16).
      if (page?.id != null) {
        this.fleet?.progress(key, { statusPage: { id: page.id, status: page.status, ...(page.round !== undefined ? { round: page.round } : {}) } }).catch((err: unknown) => {
          this.logger.warn({ event: 'fleet_incident', incident: key, error: (err as Error).message }, 'fleet: could not record the status page incident on the incident key')
        })
      }
    }
    await this.startFleet()
    try {
      this.adminToken = await resolveAdminToken(this.options.adminToken, this.config.admin.tokenFile, this.config.stateDir)
    } catch (err) {
      throw new StartupError((err as Error).message)
    }
    const proxy = await listenProxy(this.proxy, listen.proxy.host, listen.proxy.port, listen.proxy.acceptors)
    const egress = this.egress === null || listen.egress === null ? null : await listenProxy(this.egress, listen.egress.host, listen.egress.port, listen.egress.acceptors)
    await this.ops.listen({ host: listen.ops.host, port: listen.ops.port })
    await this.admin.listen({ host: listen.admin.host, port: listen.admin.port })
    // The addresses bound, as the proxy's (fastify names one interface's for 0.0.0.0).
    this.addresses = { proxy, ops: boundUrl(this.ops.server), admin: boundUrl(this.admin.server), egress }
    // Before incidents resume: an escalation posted again names this sidecar's admin address.
    this.notifier.alertmanager.runbook = `breakwater triage --admin ${reachable(this.addresses.admin)}`
    // Open incidents resume verification through the proxy listener, now bound.
    this.verifier.restore(this.control.state.incidents, this.fleet !== null)
    this.control.state.incidents = this.verifier.incidents
    // In the background: an etcd that does not answer must not hold the start.
    this.rejoinIncidents().catch((err: unknown) => {
      this.logger.error({ event: 'fleet_incident', error: (err as Error).message }, 'fleet: taking back the incidents of the earlier run failed')
    })
    // Only now, with every listener bound, may a generated token replace the file.
    this.adminToken = await writeAdminToken(this.adminToken)
    const token = this.adminToken
    if (token.origin === 'generated') {
      if (token.written) this.logger.info({ event: 'admin_token', path: token.path }, 'admin token generated; read it from this file')
      else this.logger.warn({ event: 'admin_token', path: token.path }, 'admin token generated but could not be written (stateDir unwritable); set BREAKWATER_ADMIN_TOKEN to use the admin API')
    }
    if (token.origin === 'file' && token.path !== null) {
      this.tokenWatcher = new TokenFileWatcher(token.path, (next) => { this.adminToken = { ...token, token: next } }, this.logger)
      await this.tokenWatcher.start(token.token)
    }
    this.dataPlane.overload.start()
    this.triggers.start()
    this.healthChecker.start(this.dataPlane.runtime.upstreams.values())
    this.reachability.watch(this.dataPlane.runtime.upstreams.values())
    this.logger.info({ event: 'listening', ...this.addresses, version: this.config.version, routes: this.config.routes.length, upstreams: Object.keys(this.config.upstreams).length }, 'listening')
    return this.addresses
  }

  /** Only with `fleet` configured is the fleet module (and the etcd client) loaded at all. */
  private async startFleet (): Promise<void> {
    const cfg = this.config.fleet
    if (cfg === null) return
    const { Fleet } = await import('./fleet/fleet.js')
    const control = this.control
    this.fleet = await Fleet.start(cfg, {
      service: this.config.service,
      instance: this.instance,
      logger: this.logger,
      state: () => control.state.fleet,
      changed: async (kind, name, entry) => { await control.fleetChanged(kind, name, entry) }
    })
    control.fleet = this.fleet
    registerFleetMetrics(this.registry, this.fleet)
    this.fleet.onIncidentReleased = (key, last) => { this.takeOver(key, last) }
    this.fleet.onIncidentProgress = (key, holding) => { this.leaderProgress(key, holding) }
    this.fleet.onIncidentLost = (key, last) => { this.stepDown(key, last) }
    const notify = control.onMitigation
    control.onMitigation = (kind, record) => {
      notify(kind, record)
      // The incident's action succeeded: no other sidecar takes over to act again.
      if (kind === 'applied' && record.action === 'rollback' && record.source.startsWith('trigger:')) {
        void this.fleet?.progress(this.incidentKeyOf(record.source.slice('trigger:'.length)), { acted: true }).catch((err: unknown) => {
          this.logger.warn({ event: 'fleet_incident', error: (err as Error).message }, 'fleet: could not mark the incident as acted on')
        })
      }
    }
  }

  private incidentKeyOf (trigger: string): string {
    return incidentKey(this.config.service, this.config.version, trigger)
  }

  /**
   * One incident, one actor (SPEC §16): claim the trigger's incident in etcd. Null without a
   * fleet, or when etcd does not answer (then this sidecar acts alone, as without a fleet).
   */
  private async claimIncident (trigger: string, local?: string): Promise<Claim | null> {
    const fleet = this.fleet
    if (fleet === null) return null
    let claim: Claim
    const key = this.incidentKeyOf(trigger)
    // Taking over from a leader that left: whether it announced the incident goes on the key.
    const left = this.leftBy.get(key)
    this.leftBy.delete(key)
    try {
      const carried: Progress = {}
      if (left?.incident !== undefined) carried.incident = left.incident
      if (left?.announcedAt !== undefined) carried.announcedAt = left.announcedAt
      if (left?.announcedTo !== undefined) carried.announcedTo = left.announcedTo
      claim = await fleet.claim(key, trigger, carried, local)
    } catch (err) {
      this.logger.warn({ event: 'fleet_incident', trigger, error: (err as Error).message }, 'fleet: cannot claim the incident in etcd; this sidecar acts alone')
      return null
    }
    this.verifier.fleetRole(trigger, claim.leader ? 'leader' : 'follower', claim.holder, claim.incident)
    if (!claim.leader) this.holderProgress(fleet, this.incidentKeyOf(trigger), claim.holder)
    this.logger.info({ event: 'fleet_incident', trigger, role: claim.leader ? 'leader' : 'follower', leader: claim.holder }, claim.leader ? 'fleet: this sidecar acts for the incident' : `fleet: ${claim.holder} acts for the incident; following`)
    return claim
  }

  /**
   * The fleet incidents of an earlier run, as etcd has them now (the key is that of the
   * incident's own version). One this sidecar led is claimed again, since another sidecar may
   * have taken it over meanwhile (its lease expired, or a clean stop handed it on). One it
   * followed is read again: its leader may have been succeeded meanwhile, and the new one's
   * progress would go unrecorded here.
   */
  private async rejoinIncidents (): Promise<void> {
    const fleet = this.fleet
    if (fleet === null) return
    for (const incident of this.verifier.rejoining()) {
      const key = incidentKey(this.config.service, incident.version, incident.trigger)
      if (incident.fleet.role === 'follower') {
        await this.refollow(fleet, key, incident.trigger, incident.fleet.leader)
        continue
      }
      let claim: Claim | null = null
      try {
        // Gone meanwhile and nobody took it: held again under the fleet's id it had.
        claim = await fleet.claim(key, incident.trigger, incident.fleet.incident !== undefined ? { incident: incident.fleet.incident } : {}, incident.id)
      } catch (err) {
        this.logger.warn({ event: 'fleet_incident', trigger: incident.trigger, incident: incident.id, error: (err as Error).message }, 'fleet: cannot claim an incident led before the restart again; this sidecar goes on acting for it alone')
      }
      this.verifier.rejoined(incident.id, claim)
      if (claim === null) continue
      if (!claim.leader) this.holderProgress(fleet, key, claim.holder)
      this.logger.info({ event: 'fleet_incident', trigger: incident.trigger, incident: incident.id, role: claim.leader ? 'leader' : 'follower', leader: claim.holder }, claim.leader ? 'fleet: this sidecar still acts for an incident it led before the restart' : `fleet: ${claim.holder} took over an incident this sidecar led before the restart; following`)
    }
  }

  /** `/ready`'s word on the fleet link: etcd unreachable (readiness itself does not change, SPEC §16). */
  private fleetWarnings (): FleetWarning[] {
    const lost = this.fleet?.lost ?? null
    if (lost === null) return []
    return [{ fleet: 'etcd', error: lost.error, since: lost.since, message: `the fleet store (etcd) is unreachable since ${lost.since} (${lost.error}); the last fleet state stays in force, and fleet writes answer 503 until it is back` }]
  }

  /**
   * An incident this sidecar followed before a restart: the key's holder now leads it. Without
   * a key (the leader went before acting, and nobody took over yet) nothing changes: the
   * trigger, firing again here, claims it.
   */
  private async refollow (fleet: Fleet, key: string, trigger: string, leader: string): Promise<void> {
    let holding: Holding | null
    try {
      holding = await fleet.read(key)
    } catch (err) {
      this.logger.warn({ event: 'fleet_incident', trigger, error: (err as Error).message }, 'fleet: cannot read an incident followed before the restart')
      return
    }
    if (holding === null || holding.instance === this.instance) return
    if (holding.instance !== leader) {
      this.verifier.fleetRole(trigger, 'follower', holding.instance, holding.incident)
      this.logger.info({ event: 'fleet_incident', trigger, role: 'follower', leader: holding.instance, previousLeader: leader }, `fleet: ${holding.instance} leads an incident this sidecar followed before the restart; following it`)
    }
    this.leaderProgress(key, holding)
  }

  /** What `holder` recorded on `key` before this sidecar knew it follows it (a rollback that failed at once, an escalation). */
  private holderProgress (fleet: Fleet, key: string, holder: string): void {
    const held = fleet.holding(key)
    if (held?.instance === holder) this.leaderProgress(key, held)
  }

  /** The leader of an incident this sidecar follows escalated it, verified its restoration or updated its status page incident. */
  private leaderProgress (key: string, holding: Holding): void {
    const trigger = this.triggerOfIncident(key)?.name
    if (trigger === undefined) return
    // Should this sidecar act for the incident later, it updates the leader's page incident.
    if (holding.statusPage !== undefined) this.notifier.statusPage.adopt(key, holding.statusPage)
    if (this.verifier.followHolder(trigger, holding.instance, holding.incident)) {
      this.logger.info({ event: 'fleet_incident', trigger, role: 'follower', leader: holding.instance }, `fleet: ${holding.instance} holds the incident now (its leader left while this sidecar read the fleet state afresh); following`)
    }
    const incident = this.verifier.leaderProgress(trigger, holding.instance, holding)
    // Restoration verified for the fleet ends this follower's Alertmanager alert too (SPEC §16),
    // without waiting for its own trigger window to forget the failures; a trigger that fires
    // again after it re-arms posts a new one.
    if (holding.restoredAt !== undefined && incident?.status === 'restored') this.notifier.alertmanager.resolve(trigger)
  }

  /**
   * This sidecar led the incident `key` and lost the key (SPEC §16): its lease lapsed — the
   * process frozen or starved past the ttl — or another sidecar holds it now. It stops acting at
   * once and follows the holder; with none, it claims the incident again as any follower whose
   * leader left would, carrying on what the key recorded.
   */
  private stepDown (key: string, last: Holding): void {
    const fleet = this.fleet
    const trigger = this.triggerOfIncident(key)
    if (fleet === null || trigger === undefined || this.stopping !== null || !this.verifier.stepDown(trigger.name, this.instance)) return
    fleet.stepDownsTotal++
    this.logger.warn({ event: 'fleet_incident', trigger: trigger.name, role: 'follower', previousLeader: this.instance }, 'fleet: this sidecar lost the incident key (its lease lapsed, or another sidecar holds it); stepping down: it acts no more for the incident until it holds the key again')
    fleet.read(key).then((holding) => {
      if (holding === null || holding.instance === this.instance) { this.takeOver(key, last); return }
      this.logger.warn({ event: 'fleet_incident', trigger: trigger.name, role: 'follower', leader: holding.instance, previousLeader: this.instance }, `fleet: ${holding.instance} holds the incident now; following it`)
      this.leaderProgress(key, holding)
    }, (err: unknown) => {
      this.logger.warn({ event: 'fleet_incident', trigger: trigger.name, error: (err as Error).message }, 'fleet: cannot read who holds the incident this sidecar stepped down from; claiming it again')
      this.takeOver(key, last)
    })
  }

  /**
   * The incident's leader left before acting: a sidecar whose trigger still fires acts now,
   * on the leader's status page incident (as last written on the key), not on a second one.
   */
  private takeOver (key: string, last: Holding): void {
    const trigger = this.triggerOfIncident(key)
    if (trigger === undefined) return
    if (last.acted) {
      this.succeed(key, trigger, last).catch((err: unknown) => {
        this.logger.error({ event: 'fleet_incident', trigger: trigger.name, error: (err as Error).message }, 'fleet: carrying on the incident its leader left failed')
      })
      return
    }
    const live = this.triggers.status().find((s) => s.name === trigger.name)
    if (live?.state !== 'fired') {
      // Still-firing sidecars claim at once; one of them acts. A sidecar whose own signal has
      // cleared waits CLEARED_CLAIM_DELAY_MS before it claims, so that it holds the incident
      // only when none does — else nobody would end it.
      setTimeout(() => {
        this.holdCleared(key, trigger, last).catch((err: unknown) => {
          this.logger.error({ event: 'fleet_incident', trigger: trigger.name, error: (err as Error).message }, 'fleet: holding the incident its leader left failed')
        })
      }, CLEARED_CLAIM_DELAY_MS).unref()
      return
    }
    this.carryPageIncident(key, last)
    this.leftBy.set(key, last)
    this.triggerAction(trigger, { value: live.value ?? 0, requests: live.requests, errors: live.errors }, null).catch((err: unknown) => {
      this.logger.error({ event: 'fleet_incident', trigger: trigger.name, error: (err as Error).message }, 'fleet: taking over the incident failed')
    })
  }

  /**
   * The incident's leader left before acting, and this sidecar's own signal no longer fires:
   * unless a still-firing sidecar claimed the incident meanwhile (it acts, this one follows it),
   * this one holds it on — it does not act, it verifies on its own traffic that service is back,
   * and ends the incident for the fleet on the leader's page incident (verify.ts `signalCleared`).
   * Without this, an incident whose leader left while every other sidecar had re-armed stayed
   * open on every follower, and its status page incident with it.
   */
  private async holdCleared (key: string, trigger: Config['rollbackTriggers'][number], last: Holding): Promise<void> {
    if (this.stopping !== null || !await this.holdLeft(key, trigger.name, last, false)) return
    this.verifier.fleetRole(trigger.name, 'leader', this.instance, this.fleet?.holding(key)?.incident)
    this.logger.info({ event: 'fleet_incident', trigger: trigger.name, role: 'leader', leader: this.instance, previousLeader: last.instance }, 'fleet: this sidecar holds the incident its leader left before acting; its own signal has cleared, so it verifies restoration instead of acting')
    // Firing again meanwhile, it acts as a taker-over does; else it verifies now.
    const live = this.triggers.status().find((s) => s.name === trigger.name)
    if (live?.state === 'fired') {
      this.triggerAction(trigger, { value: live.value ?? 0, requests: live.requests, errors: live.errors }, null).catch((err: unknown) => {
        this.logger.error({ event: 'fleet_incident', trigger: trigger.name, error: (err as Error).message }, 'fleet: taking over the incident failed')
      })
      return
    }
    this.verifier.signalCleared(trigger.name)
  }

  /**
   * The incident's leader left after acting, before restoration was verified: one sidecar that
   * followed it holds the incident on, without acting again — it verifies, escalates and updates
   * the page incident the leader would have; the others follow it.
   */
  private async succeed (key: string, trigger: Config['rollbackTriggers'][number], last: Holding): Promise<void> {
    if (!await this.holdLeft(key, trigger.name, last, true)) return
    this.verifier.succeed(trigger.name, last.instance, this.instance, trigger.action)
    this.logger.info({ event: 'fleet_incident', trigger: trigger.name, role: 'leader', leader: this.instance, previousLeader: last.instance }, 'fleet: this sidecar carries on the incident its leader left after acting')
  }

  /**
   * Claim the incident `key` its leader (`last`) left, as a sidecar that followed it: true when
   * this sidecar holds it now, on the leader's page incident. What the leader recorded stays on
   * the key — whether it acted (`acted`), its escalation (the fleet escalates once), its page
   * incident. Another sidecar's claim won: this one follows that one.
   */
  private async holdLeft (key: string, trigger: string, last: Holding, acted: boolean): Promise<boolean> {
    const fleet = this.fleet
    if (fleet === null || !this.verifier.follows(trigger, last.instance)) return false
    const carried: Progress = { acted }
    if (last.incident !== undefined) carried.incident = last.incident
    if (last.announcedAt !== undefined) carried.announcedAt = last.announcedAt
    if (last.announcedTo !== undefined) carried.announcedTo = last.announcedTo
    if (last.escalatedAt !== undefined) carried.escalatedAt = last.escalatedAt
    // The leader's last write may not have reached this sidecar's watch yet: what this sidecar's
    // own status page client already knows of the same page incident counts too.
    if (last.statusPage !== undefined) carried.statusPage = furtherPage(last.statusPage, this.notifier.statusPage.get(key))
    let claim: Claim
    // A claim etcd did not answer is tried again: given up, the incident would have no actor.
    for (let pause = CLAIM_RETRY_MIN_MS; ; pause = Math.min(pause * 2, CLAIM_RETRY_MAX_MS)) {
      try {
        claim = await fleet.claim(key, trigger, carried)
        break
      } catch (err) {
        this.logger.warn({ event: 'fleet_incident', trigger, previousLeader: last.instance, error: (err as Error).message, retryInMs: pause }, 'fleet: cannot claim the incident its leader left; trying again')
      }
      await new Promise((resolve) => setTimeout(resolve, pause).unref())
      if (this.stopping !== null || !this.verifier.follows(trigger, last.instance)) return false
    }
    if (!claim.leader) {
      this.verifier.fleetRole(trigger, 'follower', claim.holder, claim.incident)
      this.holderProgress(fleet, key, claim.holder)
      return false
    }
    this.carryPageIncident(key, last)
    return true
  }

  /**
   * This sidecar acts for an incident its leader left: it updates the leader's page incident, as
   * written on the key; with none written, the leader may still have created one (its answer
   * lost with it), so it is looked for on the page before one is created.
   */
  private carryPageIncident (key: string, last: Holding): void {
    if (last.statusPage !== undefined) this.notifier.statusPage.adopt(key, last.statusPage)
    else this.notifier.statusPage.inherit(key)
  }

  /** The rollback trigger whose incidents go by `key` (`incidentKeyOf` its name). */
  private triggerOfIncident (key: string): Config['rollbackTriggers'][number] | undefined {
    return this.config.rollbackTriggers.find((t) => this.incidentKeyOf(t.name) === key)
  }

  /** The data-plane listeners: proxy, and egress when configured. */
  private listeners (): ProxyServer[] {
    return this.egress === null ? [this.proxy] : [this.proxy, this.egress]
  }

  private async lockStateDir (): Promise<void> {
    try {
      this.stateLock = await lockStateDir(this.config.stateDir)
    } catch (err) {
      throw err instanceof StateDirLocked ? new StartupError(err.message) : err
    }
    const lock = this.stateLock
    if (lock.linkError !== null) this.logger.info({ event: 'state_lock', path: lock.path, method: lock.method, linkError: lock.linkError }, 'stateDir has no hard links; lock taken by exclusive create instead')
    if (!lock.held) this.logger.warn({ event: 'state_lock', path: lock.path, error: lock.error }, 'cannot lock stateDir (unwritable); another sidecar on this config would not be detected')
    if (lock.takenOverFrom !== null) this.logger.info({ event: 'state_lock', path: lock.path, staleOwner: lock.takenOverFrom }, 'stale stateDir lock of a stopped sidecar taken over')
    if (lock.removed.length > 0) this.logger.info({ event: 'state_temp_removed', files: lock.removed }, 'stale temp files of a stopped sidecar removed')
  }

  /** The body of `GET /v1/state`. */
  stateView (): Record<string, unknown> {
    const cfg = this.config
    const flags: Record<string, unknown> = {}
    for (const [key, enabled] of this.flags.values) {
      const origin = this.flags.sources.resolve(key)?.origin ?? 'default'
      flags[key] = { enabled, targeted: this.flags.targeted?.has(key) === true, origin: origin === 'override' ? this.control.overrides.flagInForce(key)?.origin ?? 'local' : origin, override: this.control.state.overrides[key] ?? null, fleetOverride: this.control.state.fleet.flags[key] ?? null, killSwitchFor: cfg.routes.filter((r) => r.killSwitch === key).map((r) => r.name) }
    }
    const circuits: Record<string, unknown> = {}
    for (const c of this.dataPlane.allCircuits()) {
      circuits[c.upstream] = {
        state: c.state,
        automaticState: c.automaticState,
        forced: c.forced,
        origin: this.control.overrides.circuitInForce(c.upstream)?.origin ?? 'config',
        forcedBy: this.control.state.circuits[c.upstream] ?? null,
        fleetOverride: this.control.state.fleet.circuits[c.upstream] ?? null,
        automatic: c.automatic,
        failureRate: Math.round(c.failureRate * 1e4) / 1e4,
        windowRequests: c.windowRequests,
        critical: cfg.upstreams[c.upstream]?.critical ?? false,
        configured: true
      }
    }
    // A forced circuit whose upstream a reload removed: kept, in force again when it comes back.
    for (const upstream of this.control.keptCircuits) {
      const forced = this.control.overrides.circuitInForce(upstream)
      if (forced === null || circuits[upstream] !== undefined) continue
      circuits[upstream] = { state: forced.value, automaticState: null, forced: forced.value, origin: forced.origin, forcedBy: this.control.state.circuits[upstream] ?? null, fleetOverride: this.control.state.fleet.circuits[upstream] ?? null, automatic: false, failureRate: 0, windowRequests: 0, critical: false, configured: false }
    }
    const now = performance.now()
    const upstreams: Record<string, unknown> = {}
    for (const u of this.dataPlane.runtime.upstreams.values()) {
      upstreams[u.name] = {
        critical: u.config.critical,
        inFlight: u.inFlight,
        endpoints: u.balancer.endpoints.map((e) => ({ origin: e.origin, healthy: e.healthy, ejected: e.ejectedUntil > now, inFlight: e.inFlight }))
      }
    }
    return {
      service: cfg.service,
      version: cfg.version,
      versionSince: this.control.versionSince,
      configSince: this.control.configSince,
      startedAt: this.startedAt,
      health: this.health.readiness(),
      persisted: this.control.persisted,
      flags,
      circuits,
      upstreams,
      mitigations: this.control.activeMitigations(),
      rollbacks: this.control.mitigations.rollbacks(5),
      triggers: this.triggers.status(),
      incidents: this.verifier.incidents.slice(0, 10)
    }
  }

  /** The post-mortem draft of an incident (GET /v1/incidents/:id/report), or null for an unknown id. */
  async incidentReport (id: string): Promise<IncidentReport | null> {
    const incident = this.verifier.incidents.find((i) => i.id === id)
    if (incident === undefined) return null
    // What happened before this call is in the draft: audit lines still being written (the
    // restoration's, a moment ago) are read after they land.
    await this.control.journal.flushed()
    const audit = await this.control.audit.newest(AUDIT_READ)
    return buildReport(incident, this.config.service, [...this.verifier.routesInScope(incident.scope)], audit, audit.length < AUDIT_READ, Date.now())
  }

  /** Why `mitigate rollback` would be refused now (the control plane's own check), or null. */
  private rollbackRefusal (): { code: string, message: string } | null {
    try {
      this.control.rollbacks.admit(this.config, this.control.state)
      return null
    } catch (err) {
      return { code: (err as { code?: string }).code ?? 'refused', message: (err as Error).message }
    }
  }

  /** The triage report (GET /v1/triage). */
  triageView (): Record<string, unknown> {
    const dp = this.dataPlane
    return triage({
      config: this.config,
      stats: dp.stats.allRoutes(),
      circuits: [...dp.allCircuits()].map((c) => ({ upstream: c.upstream, state: c.state, automaticState: c.automaticState, forced: c.forced, automatic: c.automatic, failureRate: c.failureRate, windowRequests: c.windowRequests })),
      failovers: [...dp.failovers.all()].flatMap((f) => f.to === null ? [] : [{ upstream: f.name, to: f.to, requests: f.servedSince, errors: f.failedSince }]),
      flagChanges: this.flags.changes,
      flagEnabled: (key) => this.flags.enabled(key),
      versionSince: this.control.versionSince,
      configSince: this.control.configSince,
      rollbackRefused: this.rollbackRefusal(),
      rateLimited: (route) => this.control.state.mitigations.some((m) => m.action === 'rateLimit' && m.status === 'active' && m.targets.includes(route)),
      usable: (name) => {
        const upstream = dp.runtime.upstreams.get(name)
        // Ejections run on `performance.now()` (balancer.ts), not on the wall clock.
        return upstream !== undefined && hasUsableEndpoint(upstream, performance.now())
      },
      now: Date.now(),
      windowNowMs: windowNowMs()
    }) as unknown as Record<string, unknown>
  }

  /** Swap in a validated config without dropping a connection; says what became of each upstream. */
  async apply (next: Config): Promise<UpstreamChanges> {
    await this.flags.apply(next)
    const prev = this.config
    // Settings the sidecar was set up from at start keep their running values until the restart
    // (listeners, the state lock and journal, the admin token the CLI reads, the logger's name),
    // everywhere at once — the data plane too: the running listeners' trustedProxies key the
    // rate limits — and a changed one says so (`AT_RESTART`). One list, so none is kept in one
    // place and taken in another.
    const running: Config = { ...next }
    for (const [key, at] of Object.entries(AT_RESTART) as Array<[keyof typeof AT_RESTART, typeof AT_RESTART[keyof typeof AT_RESTART]]>) {
      if (JSON.stringify(prev[key]) !== JSON.stringify(next[key])) this.logger.warn({ event: 'config_reload', key, ...at.fields?.(next) }, `${at.what} at the next restart`)
      Object.assign(running, { [key]: prev[key] })
    }
    const upstreams = this.dataPlane.apply(running)
    this.config = running
    // Tracing changes only at restart, but its spans name the version running now.
    this.spanQueue?.setVersion(running.version)
    // Before the first request on the new runtime: a re-added upstream's circuit is fresh.
    this.control.upstreamsReloaded()
    this.logger.level = next.logging.level
    // A reload that began before the shutdown does not restart the probes the shutdown stopped.
    if (this.stopping === null) {
      this.healthChecker.start(this.dataPlane.runtime.upstreams.values())
      this.reachability.watch(this.dataPlane.runtime.upstreams.values())
    }
    this.triggers.configure(next.rollbackTriggers)
    this.control.noteConfig()
    return upstreams
  }

  /**
   * Re-read the config file; an invalid one is refused and the running config kept. Audited
   * (`config.reload`, ok or refused with the problems) with who asked: an operator through the
   * admin API, or a signal (`signalActor`) — a post-mortem's timeline has every reload.
   */
  async reload (actor: Actor): Promise<ReloadResult> {
    // One reload at a time, each reading the file once the one before it is applied: two at once
    // (a config reloader's SIGHUP and an operator's POST) could otherwise apply the edit read
    // first after the one read last, leaving an older config in force than the file holds.
    const run = this.reloading.then(async () => await this.reloadInTurn(actor))
    this.reloading = run.then(() => {}, () => {})
    return await run
  }

  private async reloadInTurn (actor: Actor): Promise<ReloadResult> {
    // A shutdown stops health checks, watches and timers; a reload would start them again (and
    // swap the config of a process that is going away). Refused, and said so.
    if (this.stopping !== null) {
      this.logger.warn({ event: 'config_reload', result: 'refused', why: 'draining', requester: actor.requester }, 'config reload refused: the sidecar is shutting down')
      const problems = ['the sidecar is shutting down: a reload is not applied while it drains']
      await this.control.recordReloadRefused(actor, 'draining', problems)
      return { ok: false, problems, draining: true }
    }
    const result = await this.reloadFile()
    await this.control.recordReload(actor, result.ok, result.problems)
    return result
  }

  private async reloadFile (): Promise<ReloadResult> {
    const source = this.config.source
    if (source === null) return { ok: false, problems: ['this sidecar was not started from a file'] }
    try {
      const { config, warnings } = await loadCheckedConfig(source)
      for (const w of warnings) this.logger.warn({ event: 'config_warning' }, w)
      const upstreams = await this.apply(config)
      // A reload also re-checks the listeners' certificate files at once (SPEC §18).
      await Promise.all(this.listeners().map(async (l) => await l.certificates?.poll()))
      this.reloads.ok++
      this.logger.info({ event: 'config_reload', result: 'ok', source, version: config.version, upstreams }, 'config reloaded')
      return { ok: true, problems: [] }
    } catch (err) {
      const problems = err instanceof ConfigError ? err.problems : [(err as Error).message]
      this.reloads.failed++
      this.logger.error({ event: 'config_reload', result: 'refused', source, problems }, 'config reload refused; the running config is kept')
      return { ok: false, problems }
    }
  }

  /**
   * Graceful stop (SPEC §10, §14, §15), losing no request:
   * 1. `/health` says draining at once; for `drainDelayMs` the proxy keeps accepting and
   *    keep-alive connections stay (the load balancer is taking us out; telling clients to
   *    reconnect now would only send them to a listener about to close).
   * 2. The listener stops accepting; every connection's next response carries
   *    `Connection: close`; connections that stay idle are closed once quiet for
   *    `IDLE_CLOSE_MS` (see `closeQuietConnections`); requests in flight finish within `timeoutMs`.
   * 3. At the deadline whatever still runs is cut and logged, and the process stops. The
   *    deadline comes `teardownMs` before `drainDelayMs + timeoutMs` have passed, and closing
   *    (the last spans and log lines included) is bounded by what remains, so the whole
   *    shutdown fits in `drainDelayMs + timeoutMs` (SPEC §15: 25 s with defaults).
   * The egress listener, used by the app for its own calls, stays open to the very end so
   * draining never cuts the app off.
   */
  async shutdown (): Promise<void> {
    this.stopping ??= this.runShutdown()
    return await this.stopping
  }

  /** Cut a graceful shutdown short (a second signal). */
  hurry (): void {
    this.forceStop?.()
  }

  private async runShutdown (): Promise<void> {
    const { drainDelayMs, timeoutMs } = this.config.shutdown
    const end = performance.now() + drainDelayMs + timeoutMs
    const teardownMs = Math.min(TEARDOWN_MS, timeoutMs / 10)
    // A sidecar that never started serving (start-up failed) stops without a drain story.
    const quiet = this.addresses.proxy === ''
    const log = quiet ? () => {} : (fields: Record<string, unknown>, msg: string) => this.logger.info(fields, msg)
    this.health.draining = true
    log({ event: 'shutdown', phase: 'draining', drainDelayMs, timeoutMs }, 'draining')
    let hurried = false
    const hurry = new Promise<void>((resolve) => { this.forceStop = () => { hurried = true; resolve() } })
    await Promise.race([delay(drainDelayMs), hurry])

    stopAccepting(this.proxy)
    this.dataPlane.draining = true
    log({ event: 'shutdown', phase: 'stopped_accepting', inFlight: this.dataPlane.stats.inFlight, tunnels: this.dataPlane.tunnels.size }, 'stopped accepting connections')
    const deadline = end - teardownMs
    const quieting = new WeakSet<Socket>()
    while (!hurried && (this.dataPlane.stats.inFlight > 0 || this.proxy.connections.size > 0) && performance.now() < deadline) {
      closeQuietConnections(this.proxy.connections, quieting)
      await Promise.race([delay(20), hurry])
    }
    const abandoned = this.dataPlane.stats.inFlight + this.dataPlane.stats.receiving
    // A WebSocket tunnel is a connection, not a request (HTTP cannot ask it to close): one still
    // open at the deadline is cut like a request, and said so.
    const tunnels = this.dataPlane.tunnels.size
    if (abandoned > 0 || tunnels > 0) {
      // A second signal cut the drain short before the deadline: what is cut now is the signal's doing.
      if (hurried) this.logger.warn({ event: 'shutdown', phase: 'cut', abandoned, tunnels }, 'requests and tunnels still running when the drain was cut short are cut')
      else this.logger.warn({ event: 'shutdown', phase: 'deadline', abandoned, tunnels, timeoutMs }, 'requests and tunnels still running at the shutdown deadline are cut')
    }
    this.dataPlane.cutting = true
    this.proxy.server.close()
    this.proxy.server.closeAllConnections()
    this.healthChecker.stop()
    this.reachability.stop()
    this.tokenWatcher?.stop()
    for (const l of this.listeners()) l.certificates?.stop()
    if (this.egress !== null) {
      stopAccepting(this.egress)
      this.egress.server.close()
      this.egress.server.closeAllConnections()
    }
    await this.dataPlane.destroy()
    // Every request has ended: their spans go out now, within a bound (a dead collector never holds the exit).
    const remaining = (limitMs: number): number => hurried ? 0 : Math.max(0, Math.min(limitMs, end - performance.now()))
    if (this.spanQueue !== null) await this.spanQueue.close(remaining(SPAN_FLUSH_MS))
    await this.flags.close()
    await this.fleet?.stop()
    await this.control.stop()
    await this.stateLock?.release()
    this.triggers.stop()
    this.verifier.stop()
    await this.notifier.flush(remaining(NOTIFY_FLUSH_MS))
    this.notifier.stop()
    await this.admin.close()
    await this.ops.close()
    log({ event: 'shutdown', phase: 'stopped', abandoned, tunnels }, 'stopped')
    // The last lines out before the process exits (a stalled stdout holds the exit LOG_DRAIN_MS at most).
    await this.drainLog(remaining(LOG_DRAIN_MS))
  }

  /** Stop at once (tests). */
  async close (): Promise<void> {
    this.forceStop?.()
    this.config = { ...this.config, shutdown: { drainDelayMs: 0, timeoutMs: 0 } }
    await this.shutdown()
  }
}

/** Who asked for a reload by sending the process `signal` (the audit's actor). */
export function signalActor (signal: NodeJS.Signals): Actor {
  return { reason: `${signal} received`, requester: `signal:${signal}`, source: 'operator' }
}

/** Build and start a sidecar. */
export async function startSidecar (config: Config, options: SidecarOptions = {}): Promise<Sidecar> {
  const sidecar = new Sidecar(config, options)
  try {
    await sidecar.listen()
  } catch (err) {
    await sidecar.close().catch(() => {})
    throw err
  }
  return sidecar
}

/**
 * How long a sidecar whose own signal has cleared waits, when its incident's leader left before
 * acting, before it claims the incident: a still-firing sidecar claims on the same etcd event at
 * once (milliseconds), and should be the one that holds it, since it acts.
 */
const CLEARED_CLAIM_DELAY_MS = 2000

/** Pauses between claims of an incident its leader left while etcd does not answer them. */
const CLAIM_RETRY_MIN_MS = 250
const CLAIM_RETRY_MAX_MS = 4000

/**
 * Time kept for closing once requests in flight are cut (at most a tenth of
 * `shutdown.timeoutMs`): listeners, pools and the state lock take milliseconds, the last spans
 * and log lines get what remains of it.
 */
const TEARDOWN_MS = 1000

/** The longest a shutdown waits for the last spans to reach the collector. */
const SPAN_FLUSH_MS = 2000

/** The longest a shutdown waits for its last notifications to be delivered. */
const NOTIFY_FLUSH_MS = 3000

/** The longest a shutdown waits for its last log lines to reach stdout. */
const LOG_DRAIN_MS = 1000

/** A bound URL to connect to: a wildcard address becomes loopback. */
function reachable (url: string): string {
  return url.replace('://0.0.0.0:', '://127.0.0.1:').replace('://[::]:', '://[::1]:')
}

/**
 * How long a connection must stay idle, once draining, before it is closed. HTTP/1.1 has no
 * way to tell a client "do not send on this connection" except `Connection: close` on a
 * response, so a busy connection is left to get one; only one quiet for this long (no
 * request on the way, in all likelihood) is closed — the window in which a client's request
 * can cross our close shrinks from "any moment" to a rare coincidence.
 */
const IDLE_CLOSE_MS = 1000

/** Give each connection with no response in progress `IDLE_CLOSE_MS` of quiet before it closes. */
function closeQuietConnections (connections: ReadonlySet<Socket>, done: WeakSet<Socket>): void {
  for (const socket of connections) {
    if (done.has(socket)) continue
    const res = (socket as Socket & { _httpMessage?: { finished: boolean } | null })._httpMessage
    if (res != null && !res.finished) continue
    done.add(socket)
    // Node destroys a socket whose timeout fires with no request or response to tell. A new
    // request on it resets the timeout, and its response carries `Connection: close`.
    socket.setTimeout(IDLE_CLOSE_MS)
  }
}

async function delay (ms: number): Promise<void> {
  if (ms <= 0) return
  await new Promise<void>((resolve) => setTimeout(resolve, ms).unref())
}
