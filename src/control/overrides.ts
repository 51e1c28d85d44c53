/**
 * Flag overrides and forced circuits, with their optional `ttl` (SPEC §6, §14): the in-memory
 * records of `state.json` and the data plane kept in step with them.
 *
 * Every change is made synchronously — the record and the data plane together, with no `await`
 * in between — so concurrent operator calls cannot interleave halfway; the promise returned
 * only says when the request path sees it (the flag snapshot settles).
 */
import type { Logger } from 'pino'
import type { ForcedCircuitRecord, OverrideRecord, PersistedState } from '../state/state-file.js'
import type { CircuitControl, FlagControl } from './interfaces.js'

export interface Lapsed {
  flags: string[]
  circuits: string[]
  settled: Promise<void>
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
    return this.flags.override(key, record === null ? null : record.enabled)
  }

  /** Force (a record) or release (null) a circuit; false for an upstream without one. */
  setCircuit (upstream: string, record: ForcedCircuitRecord | null): boolean {
    if (record === null) delete this.state().circuits[upstream]
    else this.state().circuits[upstream] = record
    return this.circuits.force(upstream, record === null ? null : record.state)
  }

  /** At start: re-apply what is still in force, drop what lapsed or no longer exists. */
  async restore (now: number): Promise<void> {
    const settled: Array<Promise<void>> = []
    for (const [key, o] of Object.entries(this.state().overrides)) {
      if (expired(o.expiresAt, now) || !this.flags.defines(key)) { delete this.state().overrides[key]; continue }
      settled.push(this.flags.override(key, o.enabled))
      this.logger.warn({ event: 'override_active', flag: key, enabled: o.enabled, reason: o.reason, since: o.at, expiresAt: o.expiresAt }, 'flag override in force')
    }
    for (const [upstream, c] of Object.entries(this.state().circuits)) {
      if (expired(c.expiresAt, now) || !this.circuits.force(upstream, c.state)) { delete this.state().circuits[upstream]; continue }
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
    return { flags, circuits, settled: Promise.all(settled).then(() => {}) }
  }
}

/** The ISO time a `ttl` from now runs out, or null without one. */
export function expiry (ttlMs: number | null, now = Date.now()): string | null {
  return ttlMs === null ? null : new Date(now + ttlMs).toISOString()
}

function expired (at: string | null, now: number): boolean {
  return at !== null && Date.parse(at) <= now
}
