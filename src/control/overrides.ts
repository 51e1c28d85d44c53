/**
 * Flag overrides and forced circuits, with their optional `ttl` (SPEC §6, §14): the in-memory
 * records of `state.json` and the data plane kept in step with them.
 *
 * Two operators may decide for one flag or circuit: a local override (this sidecar) and a
 * fleet one (etcd, SPEC §16). The newest decision is in force, whichever door it came
 * through; a fleet operator's override also beats one a trigger made here, since operator
 * decisions beat triggers (§14).
 *
 * Every change is made synchronously — the record and the data plane together, with no `await`
 * in between — so concurrent operator calls cannot interleave halfway; the promise returned
 * only says when the request path sees it (the flag snapshot settles).
 */
import type { Logger } from 'pino'
import type { FleetEntry, ForcedCircuitRecord, OverrideRecord, PersistedState } from '../state/state-file.js'
import type { CircuitControl, FlagControl } from './interfaces.js'

export interface Lapsed {
  flags: string[]
  circuits: string[]
  settled: Promise<void>
}

/** Where the override in force came from. */
export type OverrideOrigin = 'local' | 'fleet'

export interface InForce<T> {
  value: T
  origin: OverrideOrigin
}

export class Overrides {
  constructor (
    private readonly state: () => PersistedState,
    private readonly flags: FlagControl,
    private readonly circuits: CircuitControl,
    private readonly logger: Logger
  ) {}

  flag (key: string): OverrideRecord | undefined {
    return this.state().overrides[key]
  }

  circuit (upstream: string): ForcedCircuitRecord | undefined {
    return this.state().circuits[upstream]
  }

  /** Set (a record) or drop (null) a flag override. */
  setFlag (key: string, record: OverrideRecord | null): Promise<void> {
    if (record === null) delete this.state().overrides[key]
    else this.state().overrides[key] = record
    return this.applyFlag(key)
  }

  /** Force (a record) or release (null) a circuit; false for an upstream without one. */
  setCircuit (upstream: string, record: ForcedCircuitRecord | null): boolean {
    if (record === null) delete this.state().circuits[upstream]
    else this.state().circuits[upstream] = record
    return this.applyCircuit(upstream)
  }

  /** Set (an entry) or forget (null) a fleet override seen in etcd. */
  setFleet (kind: 'flags' | 'circuits', name: string, entry: FleetEntry | null): Promise<void> {
    const entries = this.state().fleet[kind]
    if (entry === null) delete entries[name]
    else entries[name] = entry
    if (kind === 'circuits') { this.applyCircuit(name); return Promise.resolve() }
    // Applied even for a flag this sidecar does not define yet: in a config rollout the fleet's
    // kill reaches pods whose config lacks the flag, and must hold once a reload (or the flag
    // file, or the provider) brings it, as a forced circuit waits for its upstream.
    return this.applyFlag(name)
  }

  /** The flag override in force and where it came from, or null when none is. */
  flagInForce (key: string, now = Date.now()): InForce<boolean> | null {
    const local = this.state().overrides[key]
    return newest(local === undefined ? undefined : { record: local, value: local.enabled }, this.state().fleet.flags[key], now) as InForce<boolean> | null
  }

  /** The circuit's forced state in force and where it came from, or null when automatic. */
  circuitInForce (upstream: string, now = Date.now()): InForce<'open' | 'closed'> | null {
    const local = this.state().circuits[upstream]
    return newest(local === undefined ? undefined : { record: local, value: local.state }, this.state().fleet.circuits[upstream], now) as InForce<'open' | 'closed'> | null
  }

  private applyFlag (key: string): Promise<void> {
    return this.flags.override(key, this.flagInForce(key)?.value ?? null)
  }

  private applyCircuit (upstream: string): boolean {
    return this.circuits.force(upstream, this.circuitInForce(upstream)?.value ?? null)
  }

  /**
   * After a reload: every forced circuit, local or fleet, is forced again on the upstreams
   * configured now (a changed or re-added upstream has a new circuit). One whose upstream the
   * reload removed is kept, not dropped: it is in force again when a reload brings the upstream
   * back, since a reload never lifts an operator's decision (SPEC §14). Returns those kept.
   */
  reapplyCircuits (): string[] {
    const state = this.state()
    const absent: string[] = []
    for (const upstream of new Set([...Object.keys(state.circuits), ...Object.keys(state.fleet.circuits)])) {
      if (this.circuitInForce(upstream) === null) continue
      if (!this.applyCircuit(upstream)) absent.push(upstream)
    }
    return absent
  }

  /**
   * At start: re-apply what is still in force, drop what lapsed or (a flag override) no longer
   * exists. A forced circuit is an operator's decision about an upstream, kept while its
   * upstream is missing (`reapplyCircuits`).
   */
  async restore (now: number): Promise<void> {
    const settled: Array<Promise<void>> = []
    const fleet = this.state().fleet
    for (const [key, f] of Object.entries(fleet.flags)) {
      if (expired(f.expiresAt, now)) { delete fleet.flags[key]; continue }
      settled.push(this.applyFlag(key)) // in force once a source defines the flag (`setFleet`)
      if (f.value !== null) this.logger.warn({ event: 'override_active', scope: 'fleet', flag: key, enabled: f.value, reason: f.reason, since: f.at, expiresAt: f.expiresAt }, 'fleet flag override kept from the last fleet state')
    }
    for (const [upstream, f] of Object.entries(fleet.circuits)) {
      if (expired(f.expiresAt, now)) { delete fleet.circuits[upstream]; continue }
      this.applyCircuit(upstream)
      if (f.value !== null) this.logger.warn({ event: 'override_active', scope: 'fleet', upstream, forced: f.value, reason: f.reason, since: f.at, expiresAt: f.expiresAt }, 'fleet forced circuit kept from the last fleet state')
    }
    for (const [key, o] of Object.entries(this.state().overrides)) {
      if (expired(o.expiresAt, now) || !this.flags.defines(key)) { delete this.state().overrides[key]; continue }
      settled.push(this.applyFlag(key))
      this.logger.warn({ event: 'override_active', flag: key, enabled: o.enabled, reason: o.reason, since: o.at, expiresAt: o.expiresAt }, 'flag override in force')
    }
    for (const [upstream, c] of Object.entries(this.state().circuits)) {
      if (expired(c.expiresAt, now)) { delete this.state().circuits[upstream]; continue }
      // One whose upstream this config lacks is kept for its return, as across a reload
      // (the control plane logs it: `upstreamsReloaded`).
      if (!this.applyCircuit(upstream)) continue
      this.logger.warn({ event: 'override_active', upstream, forced: c.state, reason: c.reason, since: c.at, expiresAt: c.expiresAt }, 'forced circuit in force')
    }
    await Promise.all(settled)
  }

  /** Drop every override and forced circuit whose `ttl` has run out. */
  lapse (now: number): Lapsed {
    const state = this.state()
    const flags = Object.entries(state.overrides).filter(([, o]) => expired(o.expiresAt, now)).map(([k]) => k)
    const circuits = Object.entries(state.circuits).filter(([, c]) => expired(c.expiresAt, now)).map(([k]) => k)
    const settled = flags.map((key) => {
      this.logger.warn({ event: 'mitigation', action: 'override_expired', flag: key }, 'flag override expired')
      return this.setFlag(key, null)
    })
    for (const upstream of circuits) {
      this.logger.warn({ event: 'mitigation', action: 'override_expired', upstream }, 'forced circuit expired')
      this.setCircuit(upstream, null)
    }
    // Fleet overrides lapse on every sidecar by its own clock, etcd reachable or not.
    for (const kind of ['flags', 'circuits'] as const) {
      for (const [name, f] of Object.entries(state.fleet[kind])) {
        if (!expired(f.expiresAt, now)) continue
        this.logger.warn({ event: 'mitigation', action: 'override_expired', scope: 'fleet', [kind === 'flags' ? 'flag' : 'upstream']: name }, `fleet ${kind === 'flags' ? 'flag override' : 'forced circuit'} expired`)
        settled.push(this.setFleet(kind, name, null))
        ;(kind === 'flags' ? flags : circuits).push(name)
      }
    }
    return { flags, circuits, settled: Promise.all(settled).then(() => {}) }
  }
}

/** The ISO time a `ttl` from now runs out, or null without one. */
export function expiry (ttlMs: number | null, now = Date.now()): string | null {
  return ttlMs === null ? null : new Date(now + ttlMs).toISOString()
}

/**
 * The decision in force of a local record and a fleet entry: the newest, except that a
 * trigger's local record never beats a fleet operator's override. A dropped fleet override
 * newer than the local record means: no override.
 */
export function newest<T> (local: { record: { at: string, source?: string }, value: T } | undefined, fleet: FleetEntry | undefined, now: number): InForce<T | FleetEntry['value']> | null {
  const f = fleet !== undefined && !expired(fleet.expiresAt, now) ? fleet : undefined
  if (f === undefined) return local === undefined ? null : { value: local.value, origin: 'local' }
  const fleetWins = local === undefined ||
    Date.parse(f.at) >= Date.parse(local.record.at) ||
    (f.value !== null && (local.record.source ?? 'operator').startsWith('trigger:'))
  if (!fleetWins) return { value: local.value, origin: 'local' }
  return f.value === null ? null : { value: f.value, origin: 'fleet' }
}

export function expired (at: string | null, now: number): boolean {
  return at !== null && Date.parse(at) <= now
}
