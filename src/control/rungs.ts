/**
 * The `failover` and `rateLimit` mitigations (SPEC §17, rungs 3 and 5): an operator sends an
 * upstream's traffic to another upstream, or caps a route's rate, until lifted or until its
 * `ttl` runs out.
 *
 * What is in force is derived from the records alone: for each upstream (or route), the
 * newest active record that names it decides; with none, the data plane goes back to its
 * configuration (the configured automatic failover, the configured rate limit or none). So
 * lifting or expiring one of two overlapping records restores exactly what the other one (or
 * the config) says, in whatever order they are lifted, and a restart re-applies the same.
 *
 * A failover may also be written for the whole fleet (`"scope": "fleet"`, SPEC §16): its etcd
 * entry (`failovers/{upstream}`, kept in `state.fleet.failovers`) and this sidecar's newest
 * active record for the upstream are weighed as overrides.ts weighs flag overrides: the newest
 * decision wins, and a lifted fleet failover (value null) newer than a local record means no
 * forced failover. A fleet failover has one id on every sidecar, taken from its entry.
 *
 * Everything here is synchronous and in memory: applying, lifting and expiring never wait.
 */
import type { Logger } from 'pino'
import type { FleetEntry, MitigationRecord, PersistedState } from '../state/state-file.js'
import { ControlError, type MitigationRequest } from './interfaces.js'
import type { Mitigations } from './mitigations.js'
import { expired, expiry, newest, type InForce } from './overrides.js'

/** What these mitigations may see and change of the data plane. */
export interface RungControl {
  /** Force `upstream`'s traffic to `to`, or lift the forced failover (`null`); false when either is unknown. */
  forceFailover: (upstream: string, to: string | null) => boolean
  /** Where the forced failover of `upstream` sends its traffic now: null when none is in force (a reload may have removed its target). */
  forcedFailoverTo: (upstream: string) => string | null
  /** Override a route's rate limit, or drop the override (`null`); false for an unknown route. */
  setRouteRateLimit: (route: string, limit: { requestsPerSecond: number, burst: number } | null) => boolean
  upstreams: () => string[]
  /** An upstream's configured `failover`, or null. */
  failoverOf: (upstream: string) => string | null
  routes: () => string[]
}

type RungAction = 'failover' | 'rateLimit'

export function isRung (action: string): action is RungAction {
  return action === 'failover' || action === 'rateLimit'
}

/** The fields of a failover or rate-limit record worth a log and an audit line. */
export function rungDetails (record: MitigationRecord): Record<string, unknown> {
  if (!isRung(record.action)) return {}
  return { ...(record.to !== undefined ? { to: record.to } : {}), ...(record.limit !== undefined ? { limit: record.limit } : {}), expiresAt: record.expiresAt ?? null }
}

/** The names given (each once), all of them `known`; a 400 naming the unknown ones otherwise. */
function named (given: string[] | undefined, known: string[], what: 'upstream' | 'route', purpose: string): string[] {
  if (given === undefined || given.length === 0) throw new ControlError(400, 'bad_request', `${what}s is required: ${purpose}`)
  const unknown = given.filter((n) => !known.includes(n))
  if (unknown.length > 0) throw new ControlError(400, `unknown_${what}`, `unknown ${what}(s): ${unknown.join(', ')} (configured: ${known.join(', ')})`)
  return [...new Set(given)]
}

export class Rungs {
  /** The data plane, connected once it exists. */
  private control: RungControl | null = null

  constructor (
    private readonly state: () => PersistedState,
    private readonly mitigations: Mitigations,
    private readonly logger: Logger
  ) {}

  connect (control: RungControl): void {
    this.control = control
  }

  private dataPlane (): RungControl {
    if (this.control === null) throw new ControlError(409, 'not_available', 'failover and rate limits need the data plane, which is not running')
    return this.control
  }

  /** `POST /v1/mitigations {action: "failover", upstreams, to?}`: validated, then in force at once. */
  failover (req: MitigationRequest): MitigationRecord {
    return this.logRefusal(req, () => this.startFailover(req))
  }

  /** `POST /v1/mitigations {action: "rateLimit", routes, requestsPerSecond, burst?}`. */
  rateLimit (req: MitigationRequest): MitigationRecord {
    return this.logRefusal(req, () => this.startRateLimit(req))
  }

  /** A refused request is the caller's to fix, but it is logged: someone tried to act in an incident. */
  private logRefusal<T> (req: MitigationRequest, apply: () => T): T {
    try {
      return apply()
    } catch (err) {
      if (err instanceof ControlError) this.logger.warn({ event: 'mitigation_refused', action: req.action, error: err.code, message: err.message, requester: req.requester, reason: req.reason }, `mitigation ${req.action} refused`)
      throw err
    }
  }

  private startFailover (req: MitigationRequest): MitigationRecord {
    const { targets, to } = this.failoverTargets(req)
    const record = this.mitigations.create('failover', targets, req)
    record.to = to
    return this.apply(record, req.ttlMs ?? null)
  }

  /**
   * A fleet failover's upstream and target, checked exactly as a local failover is (nothing is
   * written before this passes). One upstream per request: each is one key in etcd.
   */
  fleetFailover (req: MitigationRequest): { upstream: string, to: string } {
    return this.logRefusal(req, () => {
      const { targets, to } = this.failoverTargets(req)
      if (targets.length > 1) throw new ControlError(400, 'bad_request', `a fleet failover names one upstream (got ${targets.join(', ')}); fail them over one at a time`)
      return { upstream: targets[0] as string, to }
    })
  }

  /** The upstreams a failover names and the one target they all go to; a 400 otherwise. */
  private failoverTargets (req: MitigationRequest): { targets: string[], to: string } {
    const dp = this.dataPlane()
    const known = dp.upstreams()
    const targets = named(req.upstreams, known, 'upstream', 'the upstream(s) whose traffic fails over')
    const to = req.to ?? null
    if (to !== null && !known.includes(to)) throw new ControlError(400, 'unknown_upstream', `to: unknown upstream "${to}" (configured: ${known.join(', ')})`)
    // One target for all of them: the one given, else each one's configured failover.
    const chosen = targets.map((u) => to ?? dp.failoverOf(u))
    const missing = targets.filter((_u, i) => chosen[i] === null)
    if (missing.length > 0) throw new ControlError(400, 'no_failover_target', `${missing.join(', ')}: no failover configured (upstreams.${missing[0] as string}.failover); name one with "to" (--to)`)
    const self = targets.filter((u, i) => chosen[i] === u)
    if (self.length > 0) throw new ControlError(400, 'bad_request', `${self.join(', ')} cannot fail over to itself`)
    if (new Set(chosen).size > 1) throw new ControlError(400, 'bad_request', `${targets.join(', ')} fail over to different upstreams (${chosen.join(', ')}); fail them over one at a time`)
    return { targets, to: chosen[0] as string }
  }

  private startRateLimit (req: MitigationRequest): MitigationRecord {
    const targets = named(req.routes, this.dataPlane().routes(), 'route', 'the route(s) to rate-limit')
    const rps = req.requestsPerSecond
    if (typeof rps !== 'number' || !Number.isFinite(rps) || rps <= 0) throw new ControlError(400, 'bad_request', `requestsPerSecond must be a number above 0 (got ${JSON.stringify(rps) ?? 'nothing'})`)
    const burst = req.burst ?? Math.max(1, Math.ceil(rps))
    if (typeof burst !== 'number' || !Number.isInteger(burst) || burst < 1) throw new ControlError(400, 'bad_request', `burst must be a whole number of at least 1 (got ${JSON.stringify(burst)})`)
    const record = this.mitigations.create('rateLimit', targets, req)
    record.limit = { requestsPerSecond: rps, burst }
    return this.apply(record, req.ttlMs ?? null)
  }

  private apply (record: MitigationRecord, ttlMs: number | null): MitigationRecord {
    record.expiresAt = expiry(ttlMs, Date.parse(record.createdAt))
    this.mitigations.add(record)
    for (const target of record.targets) this.put(record.action as RungAction, target)
    return record
  }

  /** The newest active record of `action` that names `target`: the one in force for it. */
  private inForce (action: RungAction, target: string): MitigationRecord | undefined {
    return this.state().mitigations.filter((m) => m.action === action && m.status === 'active' && m.targets.includes(target)).at(-1)
  }

  /**
   * The failover in force for `upstream` and where it came from: the newest of this sidecar's
   * newest active record and the fleet entry; null when neither forces one.
   */
  failoverInForce (upstream: string, now = Date.now()): InForce<string> | null {
    const owner = this.inForce('failover', upstream)
    const local = owner?.to === undefined ? undefined : { record: { at: owner.createdAt, source: owner.source }, value: owner.to }
    return newest(local, this.state().fleet.failovers[upstream], now) as InForce<string> | null
  }

  /**
   * Whether the data plane sends `upstream`'s traffic to `to` by force now: false when a reload
   * removed that target (the decision is kept, and in force again if the target comes back).
   */
  failoverApplied (upstream: string, to: string | undefined): boolean {
    return this.control === null || (to !== undefined && this.control.forcedFailoverTo(upstream) === to)
  }

  /** This sidecar's record that decides locally for `upstream` (before weighing the fleet's). */
  localOwner (upstream: string): MitigationRecord | undefined {
    return this.inForce('failover', upstream)
  }

  /** Make the data plane do what the records (and, for a failover, the fleet entry) say for `target`. */
  private put (action: RungAction, target: string, owner?: MitigationRecord): boolean {
    const dp = this.dataPlane()
    if (action === 'rateLimit') return dp.setRouteRateLimit(target, (owner ?? this.inForce(action, target))?.limit ?? null)
    return dp.forceFailover(target, owner !== undefined ? owner.to ?? null : this.failoverInForce(target)?.value ?? null)
  }

  /** Whether the fleet entry for `upstream` is a decision newer than `record` (then it decides, not the record). */
  private fleetNewer (upstream: string, record: MitigationRecord, now: number): boolean {
    const f = this.state().fleet.failovers[upstream]
    return record.action === 'failover' && f !== undefined && !expired(f.expiresAt, now) && Date.parse(f.at) >= Date.parse(record.createdAt)
  }

  // ---- fleet failovers (SPEC §16) ----

  /** Set (an entry) or forget (null) a fleet failover and make the data plane follow; false when this sidecar cannot apply it. */
  setFleet (upstream: string, entry: FleetEntry | null): boolean {
    const failovers = this.state().fleet.failovers
    if (entry === null) delete failovers[upstream]
    else failovers[upstream] = entry
    return this.control === null || this.put('failover', upstream)
  }

  /** The fleet failovers in force or lifted, as mitigation records (views; not kept in the list). */
  fleetRecords (now = Date.now()): MitigationRecord[] {
    return Object.entries(this.state().fleet.failovers)
      .filter(([, f]) => !expired(f.expiresAt, now))
      .map(([upstream, f]) => fleetRecord(upstream, f))
  }

  /** The fleet failover with mitigation id `id`, by its upstream. */
  findFleet (id: string): { upstream: string, entry: FleetEntry } | undefined {
    for (const [upstream, entry] of Object.entries(this.state().fleet.failovers)) {
      if (fleetId(upstream, entry) === id) return { upstream, entry }
    }
    return undefined
  }

  /**
   * After `record` stopped being in force (lifted, expired): each target it decided goes to
   * the next newest record, or back to its configuration. Returns the targets it restored
   * (those a newer record still decides are left alone).
   */
  release (record: MitigationRecord): string[] {
    if (!isRung(record.action) || this.control === null) return []
    const list = this.state().mitigations
    const restored: string[] = []
    const now = Date.now()
    for (const target of record.targets) {
      const owner = this.inForce(record.action, target)
      if (owner !== undefined && list.indexOf(owner) > list.indexOf(record)) continue
      if (this.fleetNewer(target, record, now)) continue
      this.put(record.action, target)
      restored.push(target)
    }
    return restored
  }

  /**
   * Failovers and rate limits whose `ttl` has run out: lifted, and what they changed restored.
   * Fleet failovers lapse here too, on every sidecar by its own clock, etcd reachable or not.
   */
  lapse (now: number): MitigationRecord[] {
    const lapsed = this.state().mitigations.filter((m) => isRung(m.action) && m.status === 'active' && m.expiresAt != null && Date.parse(m.expiresAt) <= now)
    for (const record of lapsed) {
      this.end(record, 'ttl expired', now)
      this.release(record)
      this.logger.warn({ event: 'mitigation', action: 'mitigation_expired', id: record.id, mitigation: record.action, targets: record.targets }, `mitigation ${record.action} expired`)
    }
    for (const [upstream, f] of Object.entries(this.state().fleet.failovers)) {
      if (!expired(f.expiresAt, now)) continue
      const record = fleetRecord(upstream, f)
      this.end(record, 'ttl expired', now)
      this.setFleet(upstream, null)
      this.logger.warn({ event: 'mitigation', action: 'mitigation_expired', scope: 'fleet', id: record.id, mitigation: 'failover', targets: record.targets }, 'fleet failover expired')
      lapsed.push(record)
    }
    return lapsed
  }

  /**
   * At start: re-apply every failover and rate limit still in force, oldest first so that the
   * newest decides; one that lapsed while stopped, or names what is no longer configured, ends.
   */
  restore (now: number): MitigationRecord[] {
    const ended: MitigationRecord[] = []
    for (const record of this.state().mitigations) {
      if (!isRung(record.action) || record.status !== 'active') continue
      if (record.expiresAt != null && Date.parse(record.expiresAt) <= now) {
        this.end(record, 'ttl expired while the sidecar was stopped', now)
        ended.push(record)
        continue
      }
      const failed = record.targets.filter((target) => !this.put(record.action as RungAction, target, record))
      if (failed.length > 0) {
        const dp = this.dataPlane()
        const known = record.action === 'failover' ? dp.upstreams() : dp.routes()
        const gone = [...record.targets, ...(record.to !== undefined ? [record.to] : [])].filter((name) => !known.includes(name))
        this.end(record, `no longer configured: ${(gone.length > 0 ? gone : failed).join(', ')}`, now)
        for (const target of record.targets) this.put(record.action as RungAction, target)
        ended.push(record)
        continue
      }
      this.logger.warn({ event: 'override_active', id: record.id, mitigation: record.action, targets: record.targets, ...rungDetails(record), reason: record.reason, since: record.createdAt }, `mitigation ${record.action} in force`)
    }
    // The last fleet state (kept in stateDir): weighed against the local records just applied.
    for (const [upstream, f] of Object.entries(this.state().fleet.failovers)) {
      if (expired(f.expiresAt, now)) { delete this.state().fleet.failovers[upstream]; continue }
      const applied = this.put('failover', upstream)
      if (f.value === null) continue
      if (applied) this.logger.warn({ event: 'override_active', scope: 'fleet', id: fleetId(upstream, f), mitigation: 'failover', targets: [upstream], to: f.value, reason: f.reason, since: f.at, expiresAt: f.expiresAt }, 'fleet failover kept from the last fleet state')
      else this.logger.warn({ event: 'fleet_failover_unknown', upstream, to: f.value }, 'fleet failover names an upstream this sidecar does not have; ignored here')
    }
    return ended
  }

  private end (record: MitigationRecord, why: string, now: number): void {
    record.status = 'lifted'
    record.liftedAt = new Date(now).toISOString()
    record.liftReason = why
  }
}

/** A fleet failover's mitigation id: the one its writer gave it, the same on every sidecar. */
export function fleetId (upstream: string, entry: FleetEntry): string {
  return entry.id ?? `fleet-failover-${upstream}`
}

/** A fleet failover entry as a mitigation record (what GET /v1/state and the lift answer show). */
export function fleetRecord (upstream: string, entry: FleetEntry): MitigationRecord {
  const active = entry.value !== null
  return {
    id: fleetId(upstream, entry),
    action: 'failover',
    targets: [upstream],
    reason: entry.reason,
    source: 'operator',
    createdAt: entry.at,
    status: active ? 'active' : 'lifted',
    liftedAt: active ? null : entry.at,
    liftReason: active ? null : entry.reason,
    changes: [],
    result: null,
    expiresAt: entry.expiresAt,
    ...(active ? { to: entry.value as string } : {}),
    scope: 'fleet'
  }
}
