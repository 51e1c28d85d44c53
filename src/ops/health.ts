/**
 * The health policy behind `/health` and `/ready` (SPEC §9). Unhealthy means "take this
 * instance out of the load balancer", so only what is this instance's own problem counts:
 * draining, or a `critical` upstream (the local app) failing its active health checks, or —
 * by `health.failOnOpenCircuit` — an open circuit: of a `critical` upstream (the default), of
 * any upstream (`any`, the seed's rule, dangerous), or never. A half-open circuit is healthy.
 * A non-critical dependency's trouble shows in metrics, never in readiness — every replica
 * sees the same dependency, and failing them all turns a partial outage into a total one.
 * `/ready` adds warnings, such as a local app that does not accept connections, and stays 200.
 */
import type { DataPlane } from '../proxy/dataplane.js'
import type { ReachabilityWarning } from './reachability.js'

export interface HealthReport {
  status: 'ok' | 'degraded' | 'draining'
  reason?: string
  openCircuits?: string[]
  failingUpstreams?: string[]
  /** `/ready` only: what is wrong without failing readiness (the local app does not accept connections, etcd is unreachable). */
  warnings?: ReadyWarning[]
}

/** The fleet store (etcd) is unreachable: the last fleet state stays in force, fleet writes answer 503. */
export interface FleetWarning {
  fleet: 'etcd'
  error: string
  message: string
  since: string
}

export type ReadyWarning = ReachabilityWarning | FleetWarning

export class HealthPolicy {
  draining = false

  constructor (private readonly dp: DataPlane, private readonly warnings: () => ReadyWarning[] = () => []) {}

  /**
   * `/ready`: the health report, with `warnings` when there are any. A warning never fails
   * readiness by itself: the app behind a sidecar often starts a moment after it.
   */
  readiness (): HealthReport {
    const report = this.report()
    if (report.status === 'draining') return report
    const warnings = this.warnings()
    return warnings.length === 0 ? report : { ...report, warnings }
  }

  report (): HealthReport {
    if (this.draining) return { status: 'draining' }
    const policy = this.dp.runtime.config.health.failOnOpenCircuit
    if (policy !== 'never') {
      const open: string[] = []
      for (const c of this.dp.allCircuits()) {
        if (c.state !== 'open') continue
        if (policy === 'any' || this.dp.runtime.upstreams.get(c.upstream)?.config.critical === true) open.push(c.upstream)
      }
      if (open.length > 0) return { status: 'degraded', reason: 'Circuit breakers active', openCircuits: open }
    }
    const failing: string[] = []
    for (const u of this.dp.runtime.upstreams.values()) {
      if (u.config.critical && u.config.healthCheck !== null && !u.healthy) failing.push(u.name)
    }
    if (failing.length > 0) return { status: 'degraded', reason: 'Critical upstream failing health checks', failingUpstreams: failing }
    return { status: 'ok' }
  }
}
