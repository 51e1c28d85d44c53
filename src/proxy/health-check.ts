/**
 * Active health checks for upstreams that declare `healthCheck` (HAProxy's rise/fall, Envoy's
 * healthy/unhealthy thresholds): each endpoint is probed with `GET path` every `intervalMs`
 * (with 10 % jitter so a fleet does not probe in step), through the endpoint's own pool. A 2xx
 * or 3xx within `timeoutMs` is a success. `unhealthyThreshold` failures in a row mark the
 * endpoint unhealthy (it leaves the balancer, subject to panic); `healthyThreshold` successes
 * bring it back. Endpoints start healthy.
 */
import type { Logger } from 'pino'
import type { Upstream } from './upstreams.js'
import type { Endpoint } from './balancer.js'

interface Probe {
  upstream: Upstream
  endpoint: Endpoint
  successes: number
  failures: number
  timer: NodeJS.Timeout | null
}

export class HealthChecker {
  private probes: Probe[] = []
  private stopped = false

  constructor (private readonly logger: Logger) {}

  /** (Re)start probing for these upstreams; probes of the previous set stop. */
  start (upstreams: Iterable<Upstream>): void {
    this.stopTimers()
    this.stopped = false
    for (const upstream of upstreams) {
      if (upstream.config.healthCheck === null) {
        // A reload may have removed the check: the endpoints are healthy again by definition.
        for (const endpoint of upstream.balancer.endpoints) endpoint.healthy = true
        continue
      }
      for (const endpoint of upstream.balancer.endpoints) {
        const probe: Probe = { upstream, endpoint, successes: 0, failures: 0, timer: null }
        this.probes.push(probe)
        this.schedule(probe, 0)
      }
    }
  }

  private schedule (probe: Probe, delayMs: number): void {
    if (this.stopped) return
    probe.timer = setTimeout(() => { void this.check(probe) }, delayMs)
    probe.timer.unref()
  }

  private async check (probe: Probe): Promise<void> {
    const hc = probe.upstream.config.healthCheck
    if (hc === null || this.stopped) return
    let ok = false
    let detail: string
    try {
      const res = await probe.endpoint.pool.request({
        path: hc.path,
        method: 'GET',
        headers: { 'user-agent': 'breakwater-health-check' },
        headersTimeout: hc.timeoutMs,
        bodyTimeout: hc.timeoutMs,
        signal: AbortSignal.timeout(hc.timeoutMs)
      })
      await res.body.dump()
      ok = res.statusCode >= 200 && res.statusCode < 400
      detail = `status ${res.statusCode}`
    } catch (err) {
      detail = (err as { code?: string }).code ?? (err as Error).message
    }
    if (this.stopped || !this.probes.includes(probe)) return
    this.record(probe, ok, detail)
    this.schedule(probe, hc.intervalMs * (0.9 + Math.random() * 0.2))
  }

  private record (probe: Probe, ok: boolean, detail: string): void {
    const hc = probe.upstream.config.healthCheck
    if (hc === null) return
    const { endpoint, upstream } = probe
    if (ok) {
      probe.failures = 0
      probe.successes++
      if (!endpoint.healthy && probe.successes >= hc.healthyThreshold) {
        endpoint.healthy = true
        this.logger.info({ event: 'health_check_passing', upstream: upstream.name, endpoint: endpoint.origin }, 'endpoint healthy again')
      }
    } else {
      probe.successes = 0
      probe.failures++
      if (endpoint.healthy && probe.failures >= hc.unhealthyThreshold) {
        endpoint.healthy = false
        this.logger.warn({ event: 'health_check_failing', upstream: upstream.name, endpoint: endpoint.origin, detail, critical: upstream.config.critical }, 'endpoint failed its health checks')
      }
    }
  }

  private stopTimers (): void {
    for (const p of this.probes) if (p.timer !== null) clearTimeout(p.timer)
    this.probes = []
  }

  stop (): void {
    this.stopped = true
    this.stopTimers()
  }
}
