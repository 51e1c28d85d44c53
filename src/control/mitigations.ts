/**
 * Mitigation records (SPEC §6): what a kill switch or circuit break changed, so that lifting
 * it restores exactly that — and nothing an operator changed since. Rollback records live in
 * the same list; their life (running → succeeded | failed) is rollback-policy.ts's.
 *
 * Everything here is synchronous and in memory: applying and lifting never wait on I/O.
 */
import { randomBytes } from 'node:crypto'
import type { Change, ForcedCircuitRecord, MitigationRecord, OverrideRecord, PersistedState } from '../state/state-file.js'
import { ControlError, type Actor, type CircuitControl, type FlagControl, type MitigationRequest } from './interfaces.js'
import type { Overrides } from './overrides.js'

const MAX_KEPT = 200

/** A new mitigation id: time-ordered, unique across a fleet. */
export function mitigationId (): string {
  return `m-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`
}

/** Applied in memory; `settled` resolves once the request path sees it. */
export interface Applying<T> {
  record: T
  settled: Promise<void>
}

export class Mitigations {
  constructor (
    private readonly state: () => PersistedState,
    private readonly overrides: Overrides,
    private readonly flags: FlagControl,
    private readonly circuits: CircuitControl
  ) {}

  /** Records from an older state file, or left `running` by a sidecar that stopped mid-rollback. */
  normalise (): void {
    for (const m of this.state().mitigations) {
      if (m.action !== 'rollback') continue
      if (m.status === 'active') m.status = m.result?.ok === false ? 'failed' : 'succeeded'
      if (m.status === 'running') {
        m.status = 'failed'
        m.error = 'interrupted: the sidecar stopped while the rollback action ran'
        m.finishedAt ??= new Date().toISOString()
      }
    }
  }

  create (action: MitigationRecord['action'], targets: string[], actor: Actor, id = mitigationId()): MitigationRecord {
    return { id, action, targets, reason: actor.reason, source: actor.source, createdAt: new Date().toISOString(), status: 'active', liftedAt: null, liftReason: null, changes: [], result: null }
  }

  add (record: MitigationRecord): void {
    const list = this.state().mitigations
    list.push(record)
    while (list.length > MAX_KEPT) {
      const i = list.findIndex((r) => r.status === 'lifted' || r.status === 'failed')
      if (i === -1) break
      list.splice(i, 1)
    }
  }

  find (id: string): MitigationRecord | undefined {
    return this.state().mitigations.find((m) => m.id === id)
  }

  /** In force or in progress: active kill switches and circuit breaks, running or succeeded rollbacks. */
  inForce (): MitigationRecord[] {
    return this.state().mitigations.filter((m) => m.status === 'active' || m.status === 'running' || m.status === 'succeeded')
  }

  /** The newest rollback records, newest first. */
  rollbacks (limit: number): MitigationRecord[] {
    return this.state().mitigations.filter((m) => m.action === 'rollback').slice(-limit).reverse()
  }

  /**
   * Operator actions win over triggers (SPEC §14): a trigger leaves alone every target an
   * operator has already set, whichever way.
   */
  private operatorWins (req: MitigationRequest, targets: string[], sourceOf: (target: string) => string | undefined, isSet: (target: string) => boolean): string[] {
    if (!req.source.startsWith('trigger:')) return targets
    const free = targets.filter((t) => {
      const source = sourceOf(t)
      return !isSet(t) || (source !== undefined && source.startsWith('trigger:'))
    })
    if (free.length === 0) throw new ControlError(409, 'operator_override', `an operator already decided for ${targets.join(', ')}; the trigger leaves it alone`)
    return free
  }

  killSwitch (req: MitigationRequest): Applying<MitigationRecord> {
    let targets: string[]
    if (req.flags !== undefined && req.flags.length > 0) {
      const unknown = req.flags.filter((f) => !this.flags.defines(f))
      if (unknown.length > 0) throw new ControlError(404, 'unknown_flag', `unknown flag(s): ${unknown.join(', ')}`)
      targets = [...new Set(req.flags)]
    } else {
      targets = this.circuits.killSwitchFlags().filter((f) => this.flags.values.get(f) !== false)
      if (targets.length === 0) throw new ControlError(409, 'nothing_to_mitigate', 'no enabled flag is used as a kill switch by a route')
    }
    targets = this.operatorWins(req, targets, (key) => this.overrides.flag(key)?.source, (key) => this.overrides.flag(key) !== undefined)
    const record = this.create('killSwitch', targets, req)
    const settled = targets.map((key) => {
      record.changes.push({ kind: 'flag', target: key, before: this.overrides.flag(key) ?? null })
      return this.overrides.setFlag(key, { enabled: false, reason: req.reason, source: req.source, at: record.createdAt, expiresAt: null })
    })
    this.add(record)
    return { record, settled: Promise.all(settled).then(() => {}) }
  }

  circuitBreak (req: MitigationRequest): Applying<MitigationRecord> {
    let targets: string[]
    const known = this.circuits.upstreams()
    if (req.upstreams !== undefined && req.upstreams.length > 0) {
      const unknown = req.upstreams.filter((u) => !known.includes(u))
      if (unknown.length > 0) throw new ControlError(404, 'unknown_upstream', `unknown upstream(s): ${unknown.join(', ')}`)
      targets = [...new Set(req.upstreams)]
    } else {
      targets = this.circuits.circuits()
        .filter((c) => c.forced !== 'open' && (c.automaticState === 'half-open' || c.failureRate > 0.5))
        .map((c) => c.upstream)
      if (targets.length === 0) throw new ControlError(409, 'nothing_to_mitigate', 'no circuit is half-open or failing over 50 %')
    }
    targets = this.operatorWins(req, targets, (u) => this.overrides.circuit(u)?.source, (u) => this.overrides.circuit(u) !== undefined)
    const record = this.create('circuitBreak', targets, req)
    for (const upstream of targets) {
      record.changes.push({ kind: 'circuit', target: upstream, before: this.overrides.circuit(upstream) ?? null })
      this.overrides.setCircuit(upstream, { state: 'open', reason: req.reason, source: req.source, at: record.createdAt, expiresAt: null })
    }
    this.add(record)
    return { record, settled: Promise.resolve() }
  }

  /** Lift a mitigation: undo exactly what it changed that nobody has changed since. */
  lift (id: string, actor: Actor): Applying<{ record: MitigationRecord, restored: string[] }> {
    const record = this.find(id)
    if (record === undefined) throw new ControlError(404, 'unknown_mitigation', `no mitigation with id "${id}"`)
    if (record.status === 'running') throw new ControlError(409, 'rollback_running', `rollback ${id} is still running; it cannot be lifted before it ends`)
    if (record.status !== 'active' && record.status !== 'succeeded') throw new ControlError(409, 'not_active', `mitigation ${id} is ${record.status}${record.liftedAt !== null ? ` since ${record.liftedAt}` : ''}; nothing to lift`)
    const restored: string[] = []
    const settled: Array<Promise<void>> = []
    for (const change of [...record.changes].reverse()) {
      const undone = this.undo(change, record)
      if (undone === null) continue
      restored.push(change.target)
      settled.push(undone)
    }
    record.status = 'lifted'
    record.liftedAt = new Date().toISOString()
    record.liftReason = actor.reason
    return { record: { record, restored }, settled: Promise.all(settled).then(() => {}) }
  }

  /**
   * The active kill switches (or circuit breaks) on `target` that hold none of their targets any
   * more — an operator restored the flag (handed the circuit back, a ttl ran out) — marked
   * lifted for `reason`. A record that still holds another of its targets stays active.
   */
  ended (action: 'killSwitch' | 'circuitBreak', target: string, reason: string): MitigationRecord[] {
    const ended: MitigationRecord[] = []
    for (const m of this.state().mitigations) {
      if (m.status !== 'active' || m.action !== action || !m.targets.includes(target)) continue
      if (m.changes.some((c) => this.holds(c, m))) continue
      m.status = 'lifted'
      m.liftedAt = new Date().toISOString()
      m.liftReason = reason
      ended.push(m)
    }
    return ended
  }

  /** Whether one of this sidecar's records made the override or forced circuit set at `at` on `target`. */
  made (action: 'killSwitch' | 'circuitBreak', target: string, at: string): boolean {
    return this.state().mitigations.some((m) => m.action === action && m.createdAt === at && m.targets.includes(target))
  }

  /** Whether `change` is still in force as `record` made it (nobody changed it since). */
  private holds (change: Change, record: MitigationRecord): boolean {
    const now = change.kind === 'flag' ? this.overrides.flag(change.target) : this.overrides.circuit(change.target)
    if (now === undefined || now.at !== record.createdAt) return false
    return change.kind === 'flag' ? (now as OverrideRecord).enabled === false : (now as ForcedCircuitRecord).state === 'open'
  }

  /** Undo one change if it is still this mitigation's; null when someone changed it since. */
  private undo (change: Change, record: MitigationRecord): Promise<void> | null {
    // Someone changed it since: their action stands.
    if (!this.holds(change, record)) return null
    if (change.kind === 'flag') return this.overrides.setFlag(change.target, change.before as OverrideRecord | null)
    this.overrides.setCircuit(change.target, change.before as ForcedCircuitRecord | null)
    return Promise.resolve()
  }
}
