/**
 * Triage (SPEC §11): the signals this sidecar holds, mapped to the decision matrix, with the
 * lowest-risk mitigation that fits and the exact command to run it.
 *
 * Signals: error rate, p99 and request rate per route and upstream over the last minute
 * against the 30 minutes before it; circuit states; flag, config and version changes in the
 * last 30 minutes.
 *
 * Matrix (every scenario is checked; when several fit, the mitigation ladder of SPEC decides,
 * lowest risk first — kill switch > rollback > failover > circuit break > scale):
 *   feature regression  errors concentrated on a route with a kill switch → kill switch
 *   bad deployment      version or config changed recently, errors across routes → rollback
 *   downstream failure  one upstream failing (or its circuit open), the others fine → failover
 *                       when it has a configured failover that is healthy, else circuit break
 *                       (never for the service's own app, `critical`: only its healthy failover)
 *   traffic spike       rate ≥ 3× a baseline of at least MIN_BASELINE_RATE, with latency or
 *                       errors up → scale, or (when scaling isn't possible now) a rate limit
 *                       on the busiest route, given as the `alternative`
 * So an open circuit or a failing dependency always outranks a spike, and a "spike" against a
 * nearly idle baseline (10 req/s after 0.25 req/s is not saturation) is not one at all.
 */
import type { Config } from '../config/types.js'
import type { RouteStats } from '../proxy/stats.js'
import { emptySums, quantile, type WindowSums } from '../proxy/window.js'
import type { CircuitView } from './control-plane.js'

export type Scenario = 'healthy' | 'traffic_spike' | 'feature_regression' | 'downstream_failure' | 'bad_deployment' | 'unclear'

export interface Figures {
  requests: number
  ratePerSecond: number
  errorRate: number | null
  p99Ms: number | null
}

export interface Signal {
  name: string
  current: Figures
  baseline: Figures
  /** Errors up: at least MIN_REQUESTS, over 5 % and over twice the baseline's rate. */
  elevated: boolean
  /** Latency up: p99 at least twice the baseline's and SLOW_MIN_RISE_MS more, both with MIN_REQUESTS. */
  slow: boolean
}

export interface TriageInput {
  config: Config
  stats: Iterable<RouteStats>
  circuits: CircuitView[]
  /** Upstreams whose traffic goes to a failover now, and how the failover has answered since. */
  failovers?: ReadonlyArray<{ upstream: string, to: string, requests: number, errors: number }>
  flagChanges: ReadonlyArray<{ flag: string, enabled: boolean, at: number }>
  flagEnabled: (key: string) => boolean
  versionSince: string
  configSince: string
  /** Whether an upstream has an endpoint neither ejected nor failing its health check (all usable when not given). */
  usable?: (upstream: string) => boolean
  /** Whether an operator's rate limit (`mitigate rateLimit`) is in force on a route (none when not given). */
  rateLimited?: (route: string) => boolean
  /** Why a rollback would be refused now (running, cooling down, done already, none configured), or null. */
  rollbackRefused?: { code: string, message: string } | null
  /** The wall clock now: how recent a change is, and the report's date. */
  now: number
  /** The windows' clock now (window.ts): the traffic figures are read at it. */
  windowNowMs: number
}

export interface Recommendation {
  action: 'killSwitch' | 'rollback' | 'failover' | 'circuitBreak' | 'scale' | 'rateLimit' | 'none' | 'investigate'
  target: string | null
  command: string | null
  why: string
  /** The next rung when this one cannot be taken now (a spike: shed when scaling isn't possible). */
  alternative?: Recommendation
}

export interface TriageReport {
  generatedAt: string
  scenario: Scenario
  summary: string
  recommendation: Recommendation
  evidence: {
    all: Signal
    routes: Signal[]
    upstreams: Signal[]
    circuits: Array<{ upstream: string, state: string, forced: string | null, failureRate: number }>
    recentChanges: { version: string | null, config: string | null, flags: Array<{ flag: string, enabled: boolean, at: string }> }
  }
  ruledOut: Array<{ scenario: Scenario, why: string }>
}

const CURRENT_S = 60
const BASELINE_S = 1800
const RECENT_MS = 30 * 60_000
const MIN_REQUESTS = 10
/** How much a p99 must rise, besides doubling, to call an upstream slow (5 ms after 2 ms is noise). */
const SLOW_MIN_RISE_MS = 100
/** Requests per second the 30-minute baseline needs before a rise against it can be a spike. */
export const MIN_BASELINE_RATE = 0.5

/** The mitigation ladder (SPEC): the lower the rank, the lower the risk; it decides between scenarios. */
const LADDER: Record<Recommendation['action'], number> = { killSwitch: 1, rollback: 2, failover: 3, circuitBreak: 4, scale: 5, rateLimit: 5, none: 9, investigate: 9 }

function figures (s: WindowSums, seconds: number): Figures {
  return {
    requests: s.requests,
    ratePerSecond: round(s.requests / seconds),
    errorRate: s.requests === 0 ? null : round(s.errors / s.requests),
    p99Ms: s.latency === null ? null : roundOrNull(quantile(s.latency, 0.99))
  }
}

function signal (name: string, stats: RouteStats[], now: number): Signal {
  const nowSec = Math.floor(now / 1000) + 1
  const cur = emptySums(true)
  const base = emptySums(true)
  for (const s of stats) {
    s.window.sum(nowSec - CURRENT_S, nowSec, cur)
    s.window.sum(nowSec - CURRENT_S - BASELINE_S, nowSec - CURRENT_S, base)
  }
  const current = figures(cur, CURRENT_S)
  const baseline = figures(base, BASELINE_S)
  const elevated = current.requests >= MIN_REQUESTS && (current.errorRate ?? 0) > Math.max(0.05, 2 * (baseline.errorRate ?? 0))
  const slow = current.requests >= MIN_REQUESTS && baseline.requests >= MIN_REQUESTS && current.p99Ms !== null && baseline.p99Ms !== null &&
    current.p99Ms >= Math.max(2 * baseline.p99Ms, baseline.p99Ms + SLOW_MIN_RISE_MS)
  return { name, current, baseline, elevated, slow }
}

function group (stats: RouteStats[], key: (s: RouteStats) => string, now: number): Signal[] {
  const by = new Map<string, RouteStats[]>()
  for (const s of stats) {
    const k = key(s)
    by.set(k, [...(by.get(k) ?? []), s])
  }
  return [...by].map(([name, list]) => signal(name, list, now))
}

export function triage (input: TriageInput): TriageReport {
  const { config, now } = input
  const stats = [...input.stats].filter((s) => s.route !== '')
  const at = input.windowNowMs
  const all = signal('all', stats, at)
  const routes = group(stats, (s) => s.route, at)
  const upstreams = group(stats, (s) => s.upstream, at)
  const recentVersion = input.versionSince !== '' && now - Date.parse(input.versionSince) <= RECENT_MS ? input.versionSince : null
  const recentConfig = input.configSince !== '' && now - Date.parse(input.configSince) <= RECENT_MS ? input.configSince : null
  const flagChanges = input.flagChanges.filter((c) => now - c.at <= RECENT_MS).map((c) => ({ flag: c.flag, enabled: c.enabled, at: new Date(c.at).toISOString() }))
  const evidence: TriageReport['evidence'] = {
    all,
    routes,
    upstreams,
    circuits: input.circuits.map((c) => ({ upstream: c.upstream, state: c.state, forced: c.forced, failureRate: round(c.failureRate) })),
    recentChanges: { version: recentVersion, config: recentConfig, flags: flagChanges }
  }
  const reason = (text: string): string => `--reason ${JSON.stringify(text)}`
  // Errors on a route whose kill switch is already off, or whose upstream's circuit is forced
  // open, are mitigated: they are history, and recommending that mitigation again helps nobody.
  const forcedOpen = (upstream: string): boolean => input.circuits.some((c) => c.upstream === upstream && c.forced === 'open')
  // An upstream whose traffic a failover answers well is mitigated too: its errors (counted on
  // its routes, whoever answered) are from before. One whose failover fails as well is not.
  const failover = (upstream: string): NonNullable<TriageInput['failovers']>[number] | undefined => input.failovers?.find((f) => f.upstream === upstream)
  const failedOver = (upstream: string): boolean => {
    const f = failover(upstream)
    return f !== undefined && !failoverFailing(f)
  }
  const switchedOff = (name: string): boolean => {
    const key = config.routes.find((r) => r.name === name)?.killSwitch ?? null
    return key !== null && !input.flagEnabled(key)
  }
  const killed = (name: string): boolean => {
    const route = config.routes.find((r) => r.name === name)
    // A forced-open upstream with a failover sends the route to its failover: not isolated.
    const isolated = route !== undefined && ((forcedOpen(route.upstream) && config.upstreams[route.upstream]?.failover == null) || failedOver(route.upstream))
    return switchedOff(name) || isolated
  }
  const failingRoutes = routes.filter((r) => r.elevated && !killed(r.name))
  // An upstream is judged on the routes still sending it traffic: the errors a switched-off
  // route left in the last minute are the kill switch's, already handled, and must not turn
  // into a failover or a circuit break of the upstream behind it.
  const live = group(stats.filter((s) => !switchedOff(s.route)), (s) => s.upstream, at)
  // A dependency that answers, but far slower than it did, fails its callers as surely as one
  // that errors (SPEC §11: latency against its baseline), short of the route's timeout. Errors
  // speak louder: while an upstream errors, another's slowness (the load the retries and the
  // errors bring, say) does not make two failing upstreams of one.
  const unmitigated = live.filter((u) => !forcedOpen(u.name) && !failedOver(u.name))
  const erroring = unmitigated.filter((u) => u.elevated)
  const failingUpstreams = erroring.length > 0 ? erroring : unmitigated.filter((u) => u.slow)
  const openCircuits = input.circuits.filter((c) => c.state !== 'closed' && c.forced !== 'open' && !failedOver(c.upstream))

  type Verdict = { match: true, summary: string, recommendation: Recommendation } | { match: false, why: string }
  const verdicts: Array<[Scenario, Verdict]> = []

  // traffic spike
  const spike = all.baseline.ratePerSecond >= MIN_BASELINE_RATE && all.current.ratePerSecond >= 3 * all.baseline.ratePerSecond &&
    ((all.current.p99Ms ?? 0) >= 2 * (all.baseline.p99Ms ?? Number.POSITIVE_INFINITY) || all.elevated)
  verdicts.push(['traffic_spike', spike
    ? {
        match: true,
        summary: `traffic ${all.current.ratePerSecond}/s is ${round(all.current.ratePerSecond / all.baseline.ratePerSecond)}× the 30-minute baseline, with latency or errors up`,
        recommendation: { action: 'scale', target: config.service, command: `kubectl scale deployment/${config.service} --replicas=<more>   # or shed: limits.maxInFlight in the config`, why: 'saturation from load, not a fault in the code: add capacity or shed load', alternative: shed(routes, reason, input.rateLimited) }
      }
    : {
        match: false,
        why: all.baseline.ratePerSecond < MIN_BASELINE_RATE
          ? `the baseline (${all.baseline.ratePerSecond}/s) is below ${MIN_BASELINE_RATE}/s: too little traffic to call a rise a spike`
          : `rate ${all.current.ratePerSecond}/s vs baseline ${all.baseline.ratePerSecond}/s (a spike needs ≥ 3× with latency or errors up)`
      }])

  // feature regression: errors concentrated on one route that has a kill switch still on
  const errorsOf = (r: Signal): number => (r.current.errorRate ?? 0) * r.current.requests
  const totalErrors = failingRoutes.reduce((n, r) => n + errorsOf(r), 0)
  const top = [...failingRoutes].sort((a, b) => errorsOf(b) - errorsOf(a))[0]
  const topRoute = top === undefined ? undefined : config.routes.find((r) => r.name === top.name)
  const topShare = top === undefined || totalErrors === 0 ? 0 : errorsOf(top) / totalErrors
  if (top !== undefined && topRoute?.killSwitch != null && (failingRoutes.length === 1 || topShare >= 0.8)) {
    verdicts.push(['feature_regression', {
      match: true,
      summary: `errors are concentrated on route ${top.name} (${pct(top.current.errorRate)} vs ${pct(top.baseline.errorRate)} baseline), which kill switch ${topRoute.killSwitch} guards`,
      recommendation: { action: 'killSwitch', target: topRoute.killSwitch, command: `breakwater kill ${topRoute.killSwitch} ${reason(`errors on ${top.name}`)}`, why: 'the lowest-risk move: switch the feature off, the rest of the service keeps working' }
    }])
  } else {
    const mitigated = routes.filter((r) => r.elevated && killed(r.name)).map((r) => r.name)
    verdicts.push(['feature_regression', {
      match: false,
      why: top === undefined
        ? (mitigated.length > 0 ? `the failing route(s) ${mitigated.join(', ')} are already switched off or isolated` : 'no route has elevated errors')
        : topRoute?.killSwitch == null ? `route ${top.name} has no kill switch` : 'errors are spread across routes'
    }])
  }

  // downstream failure: one upstream failing, the others fine (or its circuit the only one open)
  const failingDependency = failingUpstreams.length === 1 && upstreams.length > 1 ? failingUpstreams[0]?.name : undefined
  const circuitFailing = openCircuits.length === 1 && failingUpstreams.length <= 1 ? openCircuits[0]?.upstream : undefined
  const dependency = failingDependency ?? circuitFailing
  // A failover already taking the traffic and failing too is no failover to recommend.
  const engaged = dependency === undefined ? undefined : failover(dependency)
  const healthy = dependency === undefined || engaged !== undefined ? null : healthyFailover(dependency, config, input.circuits, upstreams, input.usable)
  // The service's own app (critical) is never circuit-broken from here, but a healthy failover
  // of it keeps the service up: that is still rung 3.
  const critical = dependency !== undefined && config.upstreams[dependency]?.critical === true
  if (dependency !== undefined && (!critical || healthy !== null)) {
    const sig = live.find((u) => u.name === dependency)
    verdicts.push(['downstream_failure', {
      match: true,
      summary: `upstream ${dependency}${critical ? ' (the service\'s own app)' : ''} is ${sig?.slow === true && !sig.elevated ? 'slow' : 'failing'} (${pct(sig?.current.errorRate ?? null)} errors, p99 ${sig?.current.p99Ms ?? '?'} ms${sig?.slow === true ? ` against ${sig.baseline.p99Ms ?? '?'} ms` : ''}) while the other upstreams are fine`,
      recommendation: healthy !== null
        ? { action: 'failover', target: dependency, command: `breakwater failover ${dependency} --to ${healthy} ${reason(`${dependency} failing`)}`, why: `its failover ${healthy} is healthy: send the traffic there and keep serving, rather than fail fast` }
        : { action: 'circuitBreak', target: dependency, command: `breakwater circuit ${dependency} open ${reason(`${dependency} failing`)}`, why: `isolate the failing dependency: fail fast instead of waiting on it${engaged !== undefined ? ` (its traffic already goes to ${engaged.to}, which fails too: ${engaged.errors} of ${engaged.requests})` : config.upstreams[dependency]?.failover != null ? ` (its failover ${config.upstreams[dependency]?.failover ?? ''} is not healthy either)` : ''}` }
    }])
  } else {
    const isolated = input.circuits.filter((c) => c.forced === 'open').map((c) => c.upstream)
    const served = (input.failovers ?? []).filter((f) => failedOver(f.upstream)).map((f) => `${f.upstream} → ${f.to}`)
    verdicts.push(['downstream_failure', { match: false, why: failingUpstreams.length > 1 ? `${failingUpstreams.length} upstreams are failing, not one` : dependency !== undefined ? `${dependency} is the service's own app (critical), not a dependency, and has no healthy failover` : isolated.length > 0 ? `the circuit(s) of ${isolated.join(', ')} are already forced open` : served.length > 0 ? `traffic already goes to a failover that serves it (${served.join(', ')})` : 'no single upstream stands out' }])
  }

  // bad deployment: something changed recently, and errors are across routes
  const changed = recentVersion !== null || recentConfig !== null
  const acrossRoutes = failingRoutes.length >= 2 || (routes.length === 1 && failingRoutes.length === 1)
  const refused = input.rollbackRefused ?? null
  // Without a rollback action the scenario stands: the rollback is the deploy tool's to do.
  const unconfigured = refused?.code === 'rollback_not_configured'
  if (changed && acrossRoutes && (refused === null || unconfigured)) {
    verdicts.push(['bad_deployment', {
      match: true,
      summary: `errors across ${failingRoutes.length} route(s) (${pct(all.current.errorRate)} of all traffic) since ${recentVersion !== null ? `version ${config.version} at ${recentVersion}` : `a config change at ${recentConfig ?? '?'}`}`,
      recommendation: unconfigured
        ? { action: 'rollback', target: config.version, command: null, why: `the last change is the likely cause: go back to the last known-good version with your deploy tool (no rollback action is configured here, config key rollback)` }
        : { action: 'rollback', target: config.version, command: `breakwater mitigate rollback ${reason(`errors after ${config.version}`)}`, why: 'the last change is the likely cause: go back to the last known-good version' }
    }])
  } else {
    verdicts.push(['bad_deployment', { match: false, why: !changed ? 'no version or config change in the last 30 minutes' : failingRoutes.length === 0 ? 'no route has unmitigated elevated errors' : !acrossRoutes ? 'errors are on one route, not across routes' : `a rollback would be refused now: ${refused?.message ?? '?'}` }])
  }

  const rank = ([, v]: [Scenario, Verdict]): number => v.match ? LADDER[v.recommendation.action] : Number.POSITIVE_INFINITY
  const chosen = [...verdicts].sort((a, b) => rank(a) - rank(b)).find(([, v]) => v.match)
  const ruledOut = verdicts.filter(([scenario, v]) => !v.match && scenario !== chosen?.[0]).map(([scenario, v]) => ({ scenario, why: (v as { why: string }).why }))
  const report = (scenario: Scenario, summary: string, recommendation: Recommendation): TriageReport =>
    ({ generatedAt: new Date(now).toISOString(), scenario, summary, recommendation, evidence, ruledOut })
  if (chosen !== undefined) {
    const v = chosen[1] as { summary: string, recommendation: Recommendation }
    // Scenarios that also matched but rank lower are listed too, with why they were passed over.
    for (const [scenario, other] of verdicts) {
      if (other.match && scenario !== chosen[0]) ruledOut.push({ scenario, why: `also fits, but ${v.recommendation.action} ranks above ${other.recommendation.action} on the mitigation ladder (kill switch > rollback > failover > circuit break > scale)` })
    }
    return report(chosen[0], v.summary, v.recommendation)
  }
  if (failingRoutes.length === 0 && failingUpstreams.length === 0 && openCircuits.length === 0) {
    return report('healthy', `no route or upstream has elevated errors that are not already mitigated (all traffic: ${pct(all.current.errorRate)} errors over the last minute)`, { action: 'none', target: null, command: null, why: 'nothing to mitigate' })
  }
  const unclear = failingRoutes.length > 0
    ? `elevated errors on ${failingRoutes.map((r) => r.name).join(', ')}`
    : failingUpstreams.length > 0
      ? `upstream(s) ${failingUpstreams.map((u) => `${u.name} (${u.elevated ? 'errors' : 'slow'})`).join(', ')} failing`
      : `circuit(s) of ${openCircuits.map((c) => c.upstream).join(', ')} not closed`
  return report('unclear', `${unclear} without a clear pattern`, {
    action: 'investigate',
    target: null,
    command: 'breakwater status',
    why: 'no scenario of the decision matrix fits; look at the evidence'
  })
}

/**
 * A failover taking an upstream's traffic fails too: enough of its answers since (the routes'
 * windows mix them with the upstream's own failures before) have errors above 5 %.
 */
function failoverFailing (f: { requests: number, errors: number }): boolean {
  return f.requests >= MIN_REQUESTS && f.errors / f.requests > 0.05
}

/** The upstream's configured failover when it is usable: its circuit closed and its errors not up. */
function healthyFailover (upstream: string, config: Config, circuits: CircuitView[], upstreams: Signal[], usable?: (upstream: string) => boolean): string | null {
  const to = config.upstreams[upstream]?.failover ?? null
  if (to === null || to === upstream) return null
  // Every endpoint ejected or failing its health check: idle, but no place to send traffic.
  if (usable !== undefined && !usable(to)) return null
  const circuit = circuits.find((c) => c.upstream === to)
  if (circuit !== undefined && circuit.state !== 'closed') return null
  const sig = upstreams.find((u) => u.name === to)
  return sig?.elevated === true || sig?.slow === true ? null : to
}

/**
 * Rung 5 when capacity cannot be added now: a rate limit on the busiest route, at twice its
 * baseline rate (the load it served well), so the spike beyond that is refused with 429.
 */
function shed (routes: Signal[], reason: (text: string) => string, rateLimited?: (route: string) => boolean): Recommendation | undefined {
  // A route already limited sheds what it must: limiting it again is the same mitigation twice
  // (its last minute still holds the spike from before the limit).
  const busiest = [...routes].filter((r) => rateLimited?.(r.name) !== true).sort((a, b) => b.current.ratePerSecond - a.current.ratePerSecond)[0]
  if (busiest === undefined) return undefined
  const rps = Math.max(1, Math.ceil(2 * busiest.baseline.ratePerSecond))
  return {
    action: 'rateLimit',
    target: busiest.name,
    command: `breakwater mitigate rateLimit --route ${busiest.name} --rps ${rps} --ttl 30m ${reason(`traffic spike on ${busiest.name}`)}`,
    why: `when capacity cannot be added now: shed the spike on ${busiest.name} (${busiest.current.ratePerSecond}/s against ${busiest.baseline.ratePerSecond}/s) with 429s, keeping what the service served well`
  }
}

function round (x: number): number {
  return Math.round(x * 1e4) / 1e4
}

function roundOrNull (x: number | null): number | null {
  return x === null ? null : Math.round(x * 10) / 10
}

function pct (x: number | null): string {
  return x === null ? 'n/a' : `${(x * 100).toFixed(1)}%`
}
