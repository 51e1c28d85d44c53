/**
 * Every metric Breakwater exports, declared in this one file, on a registry passed in (no
 * global registry). Hot-path counters live as plain numbers in the data plane's stats and
 * are read here at scrape time; label values are route and upstream names from config,
 * never raw paths (SPEC §9).
 */
import { collectDefaultMetrics, type Registry } from 'prom-client'
import type { DataPlane } from '../proxy/dataplane.js'
import { DURATION_BUCKETS } from '../proxy/stats.js'
import type { LogStats } from '../log/logger.js'
import type { TraceStats } from './tracing.js'
import type { ListenerTlsStats } from '../proxy/tls.js'
import { STATE_VALUE } from '../proxy/circuit-breaker.js'

type Labels = Record<string, string | number>
interface Sample { labels: Labels, value: number, metricName?: string }

/** A metric whose samples are computed at scrape time from state held elsewhere. */
export function scraped (registry: Registry, name: string, help: string, type: 'counter' | 'gauge' | 'histogram', collect: () => Sample[]): void {
  registry.registerMetric({
    name,
    help,
    type,
    aggregator: 'sum',
    get: async () => ({ name, help, type, aggregator: 'sum', values: collect() }),
    reset: () => {},
    labelNames: []
  } as unknown as Parameters<Registry['registerMetric']>[0])
}

/*
 * What the metrics read, as small interfaces: this file knows the counters, not the classes
 * that keep them (the flag snapshot, the control plane, triggers, notifier, verifier).
 */

/** Flags as the request path sees them. */
export interface FlagCounters {
  readonly values: ReadonlyMap<string, boolean>
  /** Whether the flag is off by a kill (an override), not by its source. */
  killed: (key: string) => boolean
  /** Flag file reads that failed. */
  readonly fileErrors: number
  /** Flag provider errors, stale states and flags it could not evaluate. */
  readonly providerErrors: number
}

/** Mitigations applied, by action. */
export interface MitigationCounters {
  readonly mitigationsTotal: ReadonlyMap<string, number>
}

export interface TriggerCounters {
  /** Firings by trigger name (every configured trigger present, from 0). */
  readonly firedTotal: ReadonlyMap<string, number>
  /** Each trigger's current value (error ratio or p99 ms), NaN without data. */
  values: () => Array<[string, number]>
}

/** Notifications by channel (`slack`, `pagerduty`, `statuspage`, `webhook`). */
export interface NotificationCounters {
  readonly sent: ReadonlyMap<string, number>
  readonly failed: ReadonlyMap<string, number>
  readonly dropped: number
  /** Alertmanager posts (SPEC §16), counted by their own channel. */
  readonly alertmanager: { readonly posted: number, readonly failed: number }
}

/** Time to restore, as a histogram: non-cumulative counts per bucket of `restoreBuckets`, then +Inf. */
export interface RestoreTimes {
  readonly ttrBuckets: ArrayLike<number>
  readonly ttrSum: number
  readonly ttrCount: number
}

/** Local app endpoints that do not accept connections, by upstream (`ops/reachability.ts`). */
export interface ReachabilityCounters {
  unreachable: () => ReadonlyMap<string, number>
}

export interface MetricSources {
  dataPlane: DataPlane
  reachability: ReachabilityCounters
  flags: FlagCounters
  control: MitigationCounters
  triggers: TriggerCounters
  notifier: NotificationCounters
  verifier: RestoreTimes
  /** Upper bounds in seconds of the time-to-restore buckets. */
  restoreBuckets: readonly number[]
  log: LogStats
  reloads: { ok: number, failed: number }
  /** Null when tracing is not configured (its metrics are then absent). */
  tracing: TraceStats | null
  /** One per TLS listener (none: the TLS metrics are absent). */
  tls: readonly ListenerTlsStats[]
}

export function registerMetrics (registry: Registry, sources: MetricSources): void {
  const { dataPlane: dp } = sources
  collectDefaultMetrics({ register: registry })

  // `source`: who produced the status (SPEC §15), so the app's error ratio needs no subtraction.
  scraped(registry, 'breakwater_requests_total', 'Requests answered, by route, upstream, status code and who produced the status (source: upstream, breakwater).', 'counter', () => {
    const out: Sample[] = []
    for (const s of dp.stats.allRoutes()) {
      for (let code = 100; code < 600; code++) {
        const fromUpstream = s.upstreamCodes[code] as number
        if (fromUpstream > 0) out.push({ labels: { route: s.route, upstream: s.upstream, code: String(code), source: 'upstream' }, value: fromUpstream })
        const local = s.localCodes[code] as number
        if (local > 0) out.push({ labels: { route: s.route, upstream: s.upstream, code: String(code), source: 'breakwater' }, value: local })
      }
    }
    return out
  })

  scraped(registry, 'breakwater_request_duration_seconds', 'Time from request received to response complete, by route and upstream.', 'histogram', () => {
    const out: Sample[] = []
    for (const s of dp.stats.allRoutes()) {
      if (s.count === 0) continue
      const labels = { route: s.route, upstream: s.upstream }
      let cumulative = 0
      DURATION_BUCKETS.forEach((le, i) => {
        cumulative += s.buckets[i] as number
        out.push({ labels: { ...labels, le }, value: cumulative, metricName: 'breakwater_request_duration_seconds_bucket' })
      })
      out.push({ labels: { ...labels, le: '+Inf' }, value: s.count, metricName: 'breakwater_request_duration_seconds_bucket' })
      out.push({ labels, value: s.sum, metricName: 'breakwater_request_duration_seconds_sum' })
      out.push({ labels, value: s.count, metricName: 'breakwater_request_duration_seconds_count' })
    }
    return out
  })

  scraped(registry, 'breakwater_responses_cut_total', 'Responses cut after the upstream sent their head: it broke the body off (upstream_reset) or stopped sending it for idleTimeoutMs (upstream_timeout), and the client\'s connection was closed; each is also in breakwater_requests_total under the status of its head. By route, upstream, code and error.', 'counter', () => {
    const out: Sample[] = []
    for (const s of dp.stats.allRoutes()) {
      for (const [key, n] of s.cuts) {
        const [code, error] = key.split('\u0000') as [string, string]
        out.push({ labels: { route: s.route, upstream: s.upstream, code, error }, value: n })
      }
    }
    return out
  })

  scraped(registry, 'breakwater_rejections_total', 'Requests refused by a mitigation, by route and reason (kill_switch, circuit_open, bulkhead, rate_limit).', 'counter', () => {
    const out: Sample[] = []
    for (const s of dp.stats.allRoutes()) {
      for (const [reason, n] of s.rejections) out.push({ labels: { route: s.route, reason }, value: n })
    }
    return out
  })

  scraped(registry, 'breakwater_fallbacks_total', 'Degraded answers served instead of a refusal or an upstream failure, by route and kind (stale, static).', 'counter', () => {
    const out: Sample[] = []
    for (const s of dp.stats.allRoutes()) {
      if (s.fallbacks.stale > 0) out.push({ labels: { route: s.route, kind: 'stale' }, value: s.fallbacks.stale })
      if (s.fallbacks.static > 0) out.push({ labels: { route: s.route, kind: 'static' }, value: s.fallbacks.static })
    }
    return out
  })

  scraped(registry, 'breakwater_rate_limit_key_fallbacks_total', 'Rate-limited requests keyed by the client because the header their route keys on was missing, by route.', 'counter', () =>
    dp.runtime.routes.routes.filter((r) => r.rateLimiter !== null).map((r) => ({ labels: { route: r.name }, value: r.rateLimiter?.keyFallbacks ?? 0 })))

  scraped(registry, 'breakwater_failover_active', 'Upstreams whose traffic goes to their failover now (1), by upstream.', 'gauge', () =>
    [...dp.failovers.all()].map((f) => ({ labels: { upstream: f.name }, value: f.engaged ? 1 : 0 })))

  scraped(registry, 'breakwater_circuit_state', 'Circuit state per upstream with a breaker: 0 closed, 1 half-open, 2 open.', 'gauge', () =>
    [...dp.allCircuits()].map((c) => ({ labels: { upstream: c.upstream }, value: STATE_VALUE[c.state] })))

  scraped(registry, 'breakwater_circuit_transitions_total', 'Automatic circuit state changes, by upstream and new state.', 'counter', () =>
    [...dp.transitions].map(([key, n]) => {
      const [upstream, state] = key.split('\u0000') as [string, string]
      return { labels: { upstream, state }, value: n }
    }))

  scraped(registry, 'breakwater_flag_enabled', 'Flags as the request path sees them: 1 on, 0 off (killed, or off by their source: see breakwater_flag_killed).', 'gauge', () =>
    [...sources.flags.values].map(([flag, on]) => ({ labels: { flag }, value: on ? 1 : 0 })))

  scraped(registry, 'breakwater_flag_killed', 'Flags off by a kill (an operator\'s or a trigger\'s override, local or fleet): 1; off or on by their source (config, flag file, provider): 0.', 'gauge', () =>
    [...sources.flags.values].map(([flag, on]) => ({ labels: { flag }, value: !on && sources.flags.killed(flag) ? 1 : 0 })))

  scraped(registry, 'breakwater_flag_source_errors_total', 'Flag source problems, by source: file (unreadable, invalid JSON, wrong shape, refused by flagd), provider (error, stale, a flag it cannot evaluate); the last good flags were kept.', 'counter', () =>
    [{ labels: { source: 'file' }, value: sources.flags.fileErrors }, { labels: { source: 'provider' }, value: sources.flags.providerErrors }])

  scraped(registry, 'breakwater_mitigations_total', 'Mitigations applied, by action (killSwitch, circuitBreak, rollback, failover, rateLimit).', 'counter', () =>
    ['killSwitch', 'circuitBreak', 'rollback', 'failover', 'rateLimit'].map((action) => ({ labels: { action }, value: sources.control.mitigationsTotal.get(action) ?? 0 })))

  scraped(registry, 'breakwater_trigger_fired_total', 'Rollback triggers fired, by trigger.', 'counter', () =>
    [...sources.triggers.firedTotal].map(([trigger, n]) => ({ labels: { trigger }, value: n })))

  scraped(registry, 'breakwater_trigger_value', 'Current value of each trigger\'s metric (error ratio, or p99 ms); NaN without data.', 'gauge', () =>
    sources.triggers.values().map(([trigger, v]) => ({ labels: { trigger }, value: v })))

  scraped(registry, 'breakwater_notifications_failed_total', 'Notifications given up on after retries, by channel.', 'counter', () =>
    [...(['slack', 'pagerduty', 'statuspage', 'webhook'] as const).map((channel) => ({ labels: { channel }, value: sources.notifier.failed.get(channel) ?? 0 })), { labels: { channel: 'alertmanager' }, value: sources.notifier.alertmanager.failed }])

  scraped(registry, 'breakwater_notifications_sent_total', 'Notifications delivered, by channel.', 'counter', () =>
    [...(['slack', 'pagerduty', 'statuspage', 'webhook'] as const).map((channel) => ({ labels: { channel }, value: sources.notifier.sent.get(channel) ?? 0 })), { labels: { channel: 'alertmanager' }, value: sources.notifier.alertmanager.posted }])

  scraped(registry, 'breakwater_notifications_dropped_total', 'Notifications dropped because the queue was full.', 'counter', () =>
    [{ labels: {}, value: sources.notifier.dropped }])

  scraped(registry, 'breakwater_faults_injected_total', 'Faults injected on purpose (game days), by route and type (abort, delay).', 'counter', () => {
    const out: Sample[] = []
    for (const s of dp.stats.allRoutes()) {
      if (s.faultsAborted > 0) out.push({ labels: { route: s.route, type: 'abort' }, value: s.faultsAborted })
      if (s.faultsDelayed > 0) out.push({ labels: { route: s.route, type: 'delay' }, value: s.faultsDelayed })
    }
    return out
  })

  scraped(registry, 'breakwater_time_to_restore_seconds', 'Time from detection to verified restoration, per incident.', 'histogram', () => {
    const v = sources.verifier
    const out: Sample[] = []
    let cumulative = 0
    sources.restoreBuckets.forEach((le, i) => {
      cumulative += v.ttrBuckets[i] as number
      out.push({ labels: { le }, value: cumulative, metricName: 'breakwater_time_to_restore_seconds_bucket' })
    })
    out.push({ labels: { le: '+Inf' }, value: v.ttrCount, metricName: 'breakwater_time_to_restore_seconds_bucket' })
    out.push({ labels: {}, value: v.ttrSum, metricName: 'breakwater_time_to_restore_seconds_sum' })
    out.push({ labels: {}, value: v.ttrCount, metricName: 'breakwater_time_to_restore_seconds_count' })
    return out
  })

  scraped(registry, 'breakwater_overloaded_total', 'Requests refused with 503 overloaded, by limit.', 'counter', () =>
    Object.entries(dp.stats.overloaded).map(([reason, n]) => ({ labels: { reason }, value: n })))

  scraped(registry, 'breakwater_client_errors_total', 'Requests refused or cut because of the client (malformed, smuggling attempts, oversized headers, CONNECT, slow clients), by error.', 'counter', () =>
    [...dp.stats.clientErrors].map(([error, n]) => ({ labels: { error }, value: n })))

  scraped(registry, 'breakwater_retries_total', 'Retries made, by route.', 'counter', () =>
    [...dp.stats.allRoutes()].filter((s) => s.route !== '').map((s) => ({ labels: { route: s.route }, value: s.retries })))

  scraped(registry, 'breakwater_retry_budget_exhausted_total', 'Retries not made because the route\'s retry budget was spent.', 'counter', () =>
    [...dp.stats.allRoutes()].filter((s) => s.route !== '').map((s) => ({ labels: { route: s.route }, value: s.retryBudgetExhausted })))

  scraped(registry, 'breakwater_ejections_total', 'Endpoints ejected after consecutive failures, by upstream.', 'counter', () =>
    [...dp.runtime.upstreams.keys()].map((upstream) => ({ labels: { upstream }, value: dp.stats.ejections.get(upstream) ?? 0 })))

  scraped(registry, 'breakwater_upstream_endpoints', 'Endpoints per upstream by state (ready, ejected, unhealthy).', 'gauge', () => {
    const out: Sample[] = []
    const now = performance.now()
    for (const u of dp.runtime.upstreams.values()) {
      const states = u.balancer.states(now)
      for (const [state, n] of Object.entries(states)) out.push({ labels: { upstream: u.name, state }, value: n })
    }
    return out
  })

  scraped(registry, 'breakwater_upstream_unreachable_endpoints', 'Endpoints of the local app (critical or loopback upstreams) that do not accept connections.', 'gauge', () =>
    [...sources.reachability.unreachable()].map(([upstream, n]) => ({ labels: { upstream }, value: n })))

  scraped(registry, 'breakwater_in_flight_requests', 'Requests being proxied now.', 'gauge', () => [{ labels: {}, value: dp.stats.inFlight }])

  scraped(registry, 'breakwater_log_lines_dropped_total', 'Log lines dropped because stdout could not keep up.', 'counter', () => [{ labels: {}, value: sources.log.dropped }])

  const tracing = sources.tracing
  if (tracing !== null) {
    scraped(registry, 'breakwater_trace_spans_dropped_total', 'Spans not exported, by reason: the export queue was full (collector slow or down), or the collector did not take their batch.', 'counter', () => [
      { labels: { reason: 'queue_full' }, value: tracing.dropped.queue_full },
      { labels: { reason: 'export_failed' }, value: tracing.dropped.export_failed }
    ])
    scraped(registry, 'breakwater_trace_spans_exported_total', 'Spans the collector accepted.', 'counter', () => [{ labels: {}, value: tracing.exported }])
  }

  // Every https:// upstream with `tls`, as the running config has them (a reload may add the first).
  scraped(registry, 'breakwater_upstream_tls_certificate_reloads_total', 'Changed CA or client certificate files of https upstreams re-read, by upstream and result (refused: the running ones were kept).', 'counter', () => {
    const out: Sample[] = []
    for (const u of dp.runtime.upstreams.values()) {
      if (u.certificates === null) continue
      out.push({ labels: { upstream: u.name, result: 'ok' }, value: u.certificates.reloads.ok })
      out.push({ labels: { upstream: u.name, result: 'refused' }, value: u.certificates.reloads.failed })
    }
    return out
  })

  const tls = sources.tls
  if (tls.length > 0) {
    scraped(registry, 'breakwater_tls_certificate_reloads_total', 'Changed certificate files re-read, by listener and result (refused: the running certificate was kept).', 'counter', () => tls.flatMap((s) => [
      { labels: { listener: s.listener, result: 'ok' }, value: s.reloads.ok },
      { labels: { listener: s.listener, result: 'refused' }, value: s.reloads.failed }
    ]))
    scraped(registry, 'breakwater_tls_handshake_failures_total', 'TLS handshakes that failed (no or an untrusted client certificate, plain HTTP on a TLS port), by listener.', 'counter', () =>
      tls.map((s) => ({ labels: { listener: s.listener }, value: s.handshakeFailures })))
  }

  scraped(registry, 'breakwater_config_reloads_total', 'Config reloads, by result.', 'counter', () => [
    { labels: { result: 'ok' }, value: sources.reloads.ok },
    { labels: { result: 'refused' }, value: sources.reloads.failed }
  ])

  // Read at scrape time: a reload that changes `version` leaves one series, with the new label.
  scraped(registry, 'breakwater_info', 'Service and version of this sidecar (value 1).', 'gauge', () => {
    const cfg = dp.runtime.config
    return [{ labels: { service: cfg.service, version: cfg.version }, value: 1 }]
  })
}

/** The fleet layer's metrics (SPEC §16), registered only when `fleet` is configured. */
export function registerFleetMetrics (registry: Registry, fleet: { connected: boolean, corruptTotal: number, stepDownsTotal: number }): void {
  scraped(registry, 'breakwater_fleet_connected', '1 while the fleet watch on etcd is live and etcd answers, else 0 (the last fleet state stays in force).', 'gauge', () => [{ labels: {}, value: fleet.connected ? 1 : 0 }])
  scraped(registry, 'breakwater_fleet_corrupt_values_total', 'Values under the fleet prefix in etcd that were not Breakwater overrides (ignored).', 'counter', () => [{ labels: {}, value: fleet.corruptTotal }])
  scraped(registry, 'breakwater_fleet_step_downs_total', 'Incidents this sidecar stopped leading because it lost their incident key in etcd (its lease lapsed, or another sidecar holds it); it follows the holder.', 'counter', () => [{ labels: {}, value: fleet.stepDownsTotal }])
}
