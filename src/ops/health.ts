/**
 * The health policy behind `/health` and `/ready` (SPEC §9). Unhealthy means "take this
 * instance out of the load balancer", so only what is this instance's own problem counts:
 * draining, or a `critical` upstream (the local app) failing its active health checks.
 * A non-critical dependency's trouble shows in metrics, never in readiness — every replica
 * sees the same dependency, and failing them all turns a partial outage into a total one.
 */
import type { DataPlane } from '../proxy/dataplane.js'

export interface HealthReport {
  status: 'ok' | 'degraded' | 'draining'
  reason?: string
  failingUpstreams?: string[]
}

export class HealthPolicy {
  draining = false

  constructor (private readonly dp: DataPlane) {}

  report (): HealthReport {
    if (this.draining) return { status: 'draining' }
    const failing: string[] = []
    for (const u of this.dp.runtime.upstreams.values()) {
      if (u.config.critical && u.config.healthCheck !== null && !u.healthy) failing.push(u.name)
    }
    if (failing.length > 0) return { status: 'degraded', reason: 'Critical upstream failing health checks', failingUpstreams: failing }
    return { status: 'ok' }
  }
}
