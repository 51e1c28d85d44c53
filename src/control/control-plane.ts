/**
 * The control plane: what the admin API, the CLI and (automatic) triggers do to restore
 * service. Its parts, each owning one concern:
 * - overrides.ts: flag overrides and forced circuits, with their `ttl`;
 * - mitigations.ts: mitigation records, and lifting exactly what one changed;
 * - rollback-policy.ts: when a rollback may run, one at a time, in the background;
 * - rungs.ts: the failover and rate-limit mitigations, and what is in force after a lift;
 * - state/journal.ts: the ordered, durable write path (`state.json`, then the audit line).
 *
 * Operators never wait (SPEC §15, STYLE 17): every mutation is applied in memory at once and
 * answered once its own state and audit line are on disk; no lock is held across a rollback
 * action or a notification. If `stateDir` is unwritable, actions still apply in memory and
 * report `persisted: false`; the data plane never needs `stateDir`.
 */
import { createHash } from 'node:crypto'
import type { Logger } from 'pino'
import type { Config } from '../config/types.js'
import { type PersistedState, type MitigationRecord, type OverrideRecord, type ForcedCircuitRecord, type FleetEntry, emptyState, STATE_FORMAT } from '../state/state-file.js'
import type { AuditInput } from '../state/audit-log.js'
import { Journal } from '../state/journal.js'
import { auditedOutcome, type RollbackResult } from './rollback.js'
import { ControlError, type Actor, type Applied, type CircuitControl, type CircuitView, type FlagControl, type FleetWriter, type MitigationRequest } from './interfaces.js'
import { Overrides, expiry, expired } from './overrides.js'
import { Mitigations, mitigationId } from './mitigations.js'
import { RollbackPolicy } from './rollback-policy.js'
import { Rungs, fleetRecord, rungDetails } from './rungs.js'

export { ControlError, type Actor, type Applied, type CircuitControl, type CircuitView, type FlagControl, type MitigationRequest } from './interfaces.js'

/**
 * What happened to a mitigation: `started` (a rollback is running), `applied` (in force; for
 * a rollback: it succeeded), `failed` (a rollback's action failed), `lifted`.
 */
export type MitigationEvent = 'started' | 'applied' | 'failed' | 'lifted'

/** A flag after an override was dropped: its value now, where that comes from, and the fleet's override when it decides. */
export interface FlagAfterClear {
  enabled: boolean
  origin: 'fleet' | 'local' | 'provider' | 'file' | 'config' | 'default'
  fleetOverride?: FleetEntry
}

export class ControlPlane {
  state: PersistedState = emptyState()
  readonly mitigationsTotal = new Map<string, number>()
  readonly journal: Journal
  readonly overrides: Overrides
  readonly mitigations: Mitigations
  readonly rollbacks = new RollbackPolicy()
  /** Failover and rate-limit mitigations; the sidecar connects them to the data plane. */
  readonly rungs: Rungs
  private ttlTimer: NodeJS.Timeout | null = null
  private absentCircuits = new Set<string>()
  /** Set once start() has run: the version and config first-seen times. */
  versionSince = ''
  configSince = ''

  /** Set when `fleet` is configured: where fleet overrides are written. */
  fleet: FleetWriter | null = null

  /** Told about every mitigation event (notifications, incidents). */
  onMitigation: (kind: MitigationEvent, record: MitigationRecord) => void = () => {}

  constructor (
    private readonly config: () => Config,
    private readonly flags: FlagControl,
    private readonly circuits: CircuitControl,
    private readonly logger: Logger
  ) {
    this.journal = new Journal(config().stateDir, logger)
    this.overrides = new Overrides(() => this.state, flags, circuits, logger)
    this.mitigations = new Mitigations(() => this.state, this.overrides, flags, circuits)
    this.rungs = new Rungs(() => this.state, this.mitigations, logger)
  }

  get audit (): Journal['audit'] {
    return this.journal.audit
  }

  /** Whether the last write to stateDir succeeded. */
  get persisted (): boolean {
    return this.journal.persisted
  }

  /** Load persisted state and re-apply what is still in force. */
  async start (): Promise<void> {
    const loaded = await this.journal.stateFile.load()
    if (loaded.problem !== null) {
      const kept = loaded.movedAside === null ? 'could not be moved aside' : 'moved aside'
      this.logger.error({ event: loaded.problem === 'corrupt' ? 'state_corrupt' : 'state_unreadable', movedAside: loaded.movedAside, error: loaded.error }, `state file ${loaded.problem === 'corrupt' ? 'corrupt' : 'unreadable'}; ${kept}, starting clean`)
    }
    if (loaded.newer !== null) {
      const { format, copiedTo, mitigationsLeftOut } = loaded.newer
      this.logger.warn({ event: 'state_newer', format, readable: STATE_FORMAT, copiedTo, mitigationsLeftOut }, `state file written by a newer Breakwater (state format ${format}); what this version knows of it is in force, the whole file ${copiedTo === null ? 'could not be copied aside' : 'is copied aside'}`)
    }
    this.state = loaded.state
    this.mitigations.normalise()
    await this.overrides.restore(Date.now())
    this.upstreamsReloaded('start')
    const ended = this.rungs.restore(Date.now())
    this.noteConfig()
    await this.journal.commit(this.state, null)
    for (const m of ended) await this.commit({ action: 'mitigation.expire', targets: m.targets, reason: m.liftReason ?? 'ended', result: 'ok', requester: 'breakwater', id: m.id, mitigation: m.action })
    this.ttlTimer = setInterval(() => { void this.expire() }, 1000)
    this.ttlTimer.unref()
  }

  /** Remember when this version and this config were first seen (triage, requireRecentChange). */
  noteConfig (): void {
    const cfg = this.config()
    const now = new Date().toISOString()
    this.state.versions[cfg.version] ??= now
    const hash = configHash(cfg)
    this.state.configs[hash] ??= now
    this.versionSince = this.state.versions[cfg.version] as string
    this.configSince = this.state.configs[hash] as string
  }

  /** Stop the ttl timer, cut a running rollback short, and let pending writes finish. */
  async stop (): Promise<void> {
    if (this.ttlTimer !== null) clearInterval(this.ttlTimer)
    this.ttlTimer = null
    await this.rollbacks.stop()
    await this.journal.flushed()
  }

  private async commit (entry: AuditInput): Promise<boolean> {
    return await this.journal.commit(this.state, entry)
  }

  // ---- flags ----

  async setFlag (key: string, enabled: boolean, actor: Actor, ttlMs: number | null): Promise<Applied<OverrideRecord>> {
    if (!this.flags.defines(key)) throw new ControlError(404, 'unknown_flag', `flag "${key}" is not defined by featureFlags or the flag file`)
    const before = this.overrides.flag(key)
    const inForce = this.overrides.flagInForce(key)
    // The same setting again (a retried call, a fan-out run twice) while this sidecar's own
    // override is the decision in force, and no mitigate record made it: the same mitigation.
    // Its time is kept (it ranks it against fleet decisions and names the mitigation), its reason
    // and ttl are the new ones, and nothing is announced again.
    const again = before !== undefined && before.enabled === enabled && inForce?.origin === 'local' && inForce.value === enabled && !this.mitigations.made('killSwitch', key, before.at)
    // One clock reading: a ttl runs from the moment the record names.
    const now = Date.now()
    const record: OverrideRecord = { enabled, reason: actor.reason, source: actor.source, at: again ? before.at : new Date(now).toISOString(), expiresAt: expiry(ttlMs, now) }
    const settled = this.overrides.setFlag(key, record)
    const ended = this.ended('flag', key, before, actor.reason)
    this.logger.warn({ event: 'mitigation', action: 'flag_override', flag: key, enabled, reason: actor.reason, requester: actor.requester, expiresAt: record.expiresAt, ...liftedIds(ended) }, enabled ? 'flag forced on' : 'flag forced off')
    const [persisted] = await Promise.all([
      this.commit({ action: 'flag.override', targets: [key], reason: actor.reason, result: 'ok', requester: actor.requester, enabled, expiresAt: record.expiresAt, ...liftedIds(ended) }),
      settled
    ])
    // Switching a feature off is a mitigation, whichever door it came through: verify it.
    if (!enabled && !again) this.onMitigation('applied', this.operatorRecord('killSwitch', key, record))
    this.announceLifted(ended)
    return { value: record, persisted }
  }

  /**
   * Drop this sidecar's override. What is in force afterwards is said, not assumed: a fleet
   * override (SPEC §16) still decides here, and a restore that leaves the fleet's kill switch
   * in force must not read as "restored" to the operator who typed it.
   */
  async clearFlag (key: string, actor: Actor): Promise<Applied<FlagAfterClear>> {
    const before = this.overrides.flag(key)
    const had = before !== undefined
    if (!this.flags.defines(key) && !had) throw new ControlError(404, 'unknown_flag', `flag "${key}" is not defined by featureFlags or the flag file`)
    const settled = this.overrides.setFlag(key, null)
    const ended = this.ended('flag', key, before, actor.reason)
    await settled
    const after = this.flagAfter(key)
    const fleetNote = after.origin === 'fleet' ? { fleetOverride: after.fleetOverride } : {}
    this.logger.warn({ event: 'mitigation', action: 'flag_override_dropped', flag: key, enabled: after.enabled, origin: after.origin, reason: actor.reason, requester: actor.requester, ...liftedIds(ended) }, after.origin === 'fleet' && !after.enabled ? 'flag override dropped; the fleet\'s kill switch is still in force' : 'flag override dropped')
    const persisted = await this.commit({ action: 'flag.clear', targets: [key], reason: actor.reason, result: had ? 'ok' : 'no_override', requester: actor.requester, enabled: after.enabled, origin: after.origin, ...liftedIds(ended) })
    this.announceLifted(ended)
    return { value: { enabled: after.enabled, origin: after.origin, ...fleetNote }, persisted }
  }

  /**
   * A flag's value as the request path sees it now and where it comes from (as `GET /v1/state`
   * names it), with the fleet's override when that is what decides.
   */
  flagAfter (key: string): FlagAfterClear {
    const enabled = this.flagEnabled(key)
    const source = this.flags.origin(key) ?? 'default'
    const inForce = this.overrides.flagInForce(key)
    const origin = source === 'override' ? inForce?.origin ?? 'local' : source
    const fleetOverride = origin === 'fleet' ? this.state.fleet.flags[key] : undefined
    return fleetOverride === undefined ? { enabled, origin } : { enabled, origin, fleetOverride }
  }

  // ---- circuits ----

  async setCircuit (upstream: string, state: 'open' | 'closed' | 'auto', actor: Actor, ttlMs: number | null): Promise<Applied<CircuitView>> {
    const before = this.overrides.circuit(upstream)
    // A forced circuit kept for an upstream a reload removed may still be handed back.
    const kept = state === 'auto' && before !== undefined
    if (!this.circuits.upstreams().includes(upstream) && !kept) throw new ControlError(404, 'unknown_upstream', `upstream "${upstream}" is not configured`)
    const inForce = this.overrides.circuitInForce(upstream)
    // As setFlag's: the same forced state again, this sidecar's own and in force, is the same mitigation.
    const again = before !== undefined && before.state === state && inForce?.origin === 'local' && inForce.value === state && !this.mitigations.made('circuitBreak', upstream, before.at)
    const now = Date.now()
    const record: ForcedCircuitRecord | null = state === 'auto' ? null : { state, reason: actor.reason, source: actor.source, at: again ? before.at : new Date(now).toISOString(), expiresAt: expiry(ttlMs, now) }
    this.overrides.setCircuit(upstream, record)
    const ended = this.ended('circuit', upstream, before, actor.reason)
    this.logger.warn({ event: 'mitigation', action: 'circuit_forced', upstream, state, reason: actor.reason, requester: actor.requester, ...liftedIds(ended) }, `circuit ${state === 'auto' ? 'handed back to automatic' : `forced ${state}`}`)
    const persisted = await this.commit({ action: 'circuit.force', targets: [upstream], reason: actor.reason, result: 'ok', requester: actor.requester, state, ...liftedIds(ended) })
    if (record?.state === 'open' && !again) this.onMitigation('applied', this.operatorRecord('circuitBreak', upstream, record))
    this.announceLifted(ended)
    return { value: this.circuitView(upstream), persisted }
  }

  /**
   * A reload changed the upstreams (or the sidecar started): forced circuits are forced again on
   * the circuits it built, and one whose upstream is missing is kept for its return
   * (`absentCircuits`), logged when that starts and ends.
   */
  upstreamsReloaded (cause: 'reload' | 'start' = 'reload'): void {
    const absent = new Set(this.overrides.reapplyCircuits())
    for (const upstream of absent) {
      if (this.absentCircuits.has(upstream)) continue
      const forced = this.overrides.circuitInForce(upstream)
      const why = cause === 'start' ? 'the config has no such upstream' : 'the reload removed its upstream'
      this.logger.warn({ event: 'override_kept', upstream, forced: forced?.value, origin: forced?.origin }, `forced circuit kept: ${why}; it is in force again if the upstream comes back`)
    }
    for (const upstream of this.absentCircuits) {
      if (absent.has(upstream) || !this.circuits.upstreams().includes(upstream)) continue
      const forced = this.overrides.circuitInForce(upstream)
      if (forced !== null) this.logger.warn({ event: 'override_active', upstream, forced: forced.value, origin: forced.origin }, 'forced circuit in force again: its upstream is back')
    }
    this.absentCircuits = absent
  }

  /** Upstreams a reload removed whose forced circuit is kept for their return. */
  get keptCircuits (): ReadonlySet<string> {
    return this.absentCircuits
  }

  /** Whether a flag is on now, as the request path sees it. */
  flagEnabled (key: string): boolean {
    return this.flags.values.get(key) !== false
  }

  circuitView (upstream: string): CircuitView {
    return this.circuits.circuits().find((c) => c.upstream === upstream) ?? { upstream, state: 'closed', automaticState: 'closed', forced: null, automatic: false, failureRate: 0, windowRequests: 0 }
  }

  /**
   * The record of a mitigation done by a direct flag or circuit call (not kept in the list),
   * made from its override alone: the same id when it is applied and when it ends, after a
   * restart too, and on every sidecar for a fleet override.
   */
  private operatorRecord (action: 'killSwitch' | 'circuitBreak', target: string, decision: { reason: string, source?: string, at: string }): MitigationRecord {
    const record = this.mitigations.create(action, [target], { reason: decision.reason, source: decision.source ?? 'operator', requester: 'operator' }, `${action === 'killSwitch' ? 'flag' : 'circuit'}:${target}@${Date.parse(decision.at).toString(36)}`)
    record.createdAt = decision.at
    return record
  }

  /**
   * The mitigations that ended when a flag override (a forced circuit) went from `before` to
   * what is set now — a restore, `circuit auto` or `closed`, a ttl, a newer decision. A kill
   * switch ends when its flag is no longer forced off here, a circuit break when its circuit is
   * no longer forced open: the `mitigate` records that hold none of their targets any more, or
   * the operator's direct kill (circuit open) that `before` was. Marked lifted, announced once.
   */
  private ended (kind: 'flag' | 'circuit', target: string, before: OverrideRecord | ForcedCircuitRecord | undefined, reason: string): MitigationRecord[] {
    if (before === undefined || !refuses(before)) return []
    const now = kind === 'flag' ? this.overrides.flag(target) : this.overrides.circuit(target)
    if (now !== undefined && refuses(now)) return []
    const action = kind === 'flag' ? 'killSwitch' : 'circuitBreak'
    const ended = this.mitigations.ended(action, target, reason)
    if (!this.mitigations.made(action, target, before.at)) ended.push(liftedRecord(this.operatorRecord(action, target, before), reason))
    return ended
  }

  /** The fleet kill switch (forced-open circuit) `before` ended when the fleet entry changed to what is set now. */
  private fleetEnded (kind: 'flags' | 'circuits', name: string, before: FleetEntry | undefined, reason: string): MitigationRecord[] {
    if (before === undefined || (before.value !== false && before.value !== 'open')) return []
    const now = this.state.fleet[kind][name]
    if (now !== undefined && now.value === before.value) return []
    return [liftedRecord(this.operatorRecord(kind === 'flags' ? 'killSwitch' : 'circuitBreak', name, before), reason)]
  }

  /** One `lifted` event per mitigation that ended (notifications, incidents). */
  private announceLifted (ended: readonly MitigationRecord[]): void {
    for (const record of ended) this.onMitigation('lifted', record)
  }

  // ---- fleet overrides (SPEC §16) ----

  /** Write a fleet override (a flag's value, a circuit's forced state; null drops it) to etcd. */
  async setFleetOverride (kind: 'flags' | 'circuits', name: string, value: FleetEntry['value'], actor: Actor, ttlMs: number | null): Promise<Applied<FleetEntry>> {
    if (kind === 'flags' && !this.flags.defines(name)) throw new ControlError(404, 'unknown_flag', `flag "${name}" is not defined by featureFlags or the flag file`)
    if (kind === 'circuits' && !this.circuits.upstreams().includes(name)) throw new ControlError(404, 'unknown_upstream', `upstream "${name}" is not configured`)
    const fleet = this.fleet
    if (fleet === null) throw new ControlError(400, 'fleet_not_configured', '"scope": "fleet" needs the fleet section (etcd) in the config')
    const now = Date.now()
    const entry: FleetEntry = { value, reason: actor.reason, requester: actor.requester, at: new Date(now).toISOString(), ttlMs, expiresAt: value === null ? null : expiry(ttlMs, now), instance: fleet.instance }
    // Read before the write: this sidecar's own watch may apply the entry while the write is awaited.
    const before = this.state.fleet[kind][name]
    const revision = await fleet.write(kind, name, entry)
    // In force here at once; every other sidecar applies it from its watch.
    const settled = this.watched(revision) ? Promise.resolve() : this.overrides.setFleet(kind, name, entry)
    // Announced by the sidecar that decided, as its kill was.
    const ended = this.fleetEnded(kind, name, before, actor.reason)
    const target = kind === 'flags' ? { flag: name } : { upstream: name }
    this.logger.warn({ event: 'mitigation', action: kind === 'flags' ? 'flag_override' : 'circuit_forced', scope: 'fleet', ...target, value, reason: actor.reason, requester: actor.requester, expiresAt: entry.expiresAt }, `fleet override written: ${name} ${String(value ?? 'dropped')}`)
    const [persisted] = await Promise.all([
      this.commit({ action: kind === 'flags' ? (value === null ? 'flag.clear' : 'flag.override') : 'circuit.force', scope: 'fleet', targets: [name], reason: actor.reason, result: 'ok', requester: actor.requester, value, expiresAt: entry.expiresAt, ...liftedIds(ended) }),
      settled
    ])
    if (value === false || value === 'open') this.onMitigation('applied', this.operatorRecord(kind === 'flags' ? 'killSwitch' : 'circuitBreak', name, entry))
    this.announceLifted(ended)
    return { value: entry, persisted }
  }

  /**
   * Whether this sidecar's watch has applied etcd up to `revision`, where one of its own writes
   * landed: the write is in force here already, or a newer decision another sidecar wrote after
   * it is, which applying the write again would undo here alone (the watch never delivers that
   * newer one twice). The newest decision wins (SPEC §16), as etcd orders them.
   */
  private watched (revision: number): boolean {
    return this.state.fleet.revision >= revision
  }

  /** A fleet override seen in etcd (its watch or a resync): in force here, audited here. */
  async fleetChanged (kind: 'flags' | 'circuits' | 'failovers', name: string, entry: FleetEntry | null): Promise<void> {
    // An entry whose ttl has run out: it stays in etcd (a ttl is a timestamp, not a lease), and
    // a resync or a restart reads it again. It lapsed here as everywhere (or was never in force
    // here): neither applied again nor announced as ended again.
    if (entry !== null && expired(entry.expiresAt, Date.now()) && this.state.fleet[kind][name] === undefined) return
    if (kind === 'failovers') { await this.fleetFailoverChanged(name, entry); return }
    const settled = this.overrides.setFleet(kind, name, entry)
    const target = kind === 'flags' ? { flag: name } : { upstream: name }
    this.logger.warn({ event: 'fleet_override', ...target, value: entry?.value ?? null, reason: entry?.reason, requester: entry?.requester, writer: entry?.instance, expiresAt: entry?.expiresAt ?? null }, entry === null ? `fleet override of ${name} removed` : `fleet override applied: ${name} ${String(entry.value ?? 'dropped')}`)
    await Promise.all([
      this.commit({ action: `fleet.${kind === 'flags' ? 'flag' : 'circuit'}`, scope: 'fleet', targets: [name], reason: entry?.reason ?? 'removed from etcd', result: 'applied', requester: entry?.requester ?? 'etcd', value: entry?.value ?? null, writer: entry?.instance ?? null, expiresAt: entry?.expiresAt ?? null }),
      settled
    ])
  }

  // ---- fleet failovers (SPEC §16, §17) ----

  /**
   * `POST /v1/mitigations {action: "failover", scope: "fleet"}`: checked as a local failover
   * is, then written once to etcd (`failovers/{upstream}`) and in force here at once; every
   * other sidecar applies it from its watch.
   */
  private async fleetFailover (req: MitigationRequest): Promise<Applied<MitigationRecord>> {
    const { upstream, to } = this.rungs.fleetFailover(req)
    const fleet = this.fleet
    if (fleet === null) throw new ControlError(400, 'fleet_not_configured', '"scope": "fleet" needs the fleet section (etcd) in the config')
    const now = Date.now()
    const id = mitigationId()
    const ttlMs = req.ttlMs ?? null
    const entry: FleetEntry = { value: to, reason: req.reason, requester: req.requester, at: new Date(now).toISOString(), ttlMs, expiresAt: expiry(ttlMs, now), instance: fleet.instance, id }
    const revision = await fleet.write('failovers', upstream, entry)
    if (!this.watched(revision)) this.rungs.setFleet(upstream, entry)
    const record = fleetRecord(upstream, entry)
    this.count(record)
    this.logger.warn({ event: 'mitigation', action: 'failover', scope: 'fleet', id, targets: record.targets, to, reason: req.reason, source: req.source, requester: req.requester, expiresAt: entry.expiresAt, result: 'applied' }, 'fleet failover written')
    const persisted = await this.commit({ action: 'mitigation.failover', scope: 'fleet', targets: record.targets, reason: req.reason, result: 'applied', requester: req.requester, id, source: req.source, to, expiresAt: entry.expiresAt })
    this.onMitigation('applied', record)
    return { value: record, persisted }
  }

  /** Lift a fleet failover for every sidecar: a newer decision, value null, written to etcd. */
  private async liftFleetFailover (upstream: string, entry: FleetEntry, actor: Actor): Promise<Applied<MitigationRecord>> {
    const id = fleetRecord(upstream, entry).id
    if (entry.value === null) throw new ControlError(409, 'not_active', `mitigation ${id} is lifted since ${entry.at}; nothing to lift`)
    const fleet = this.fleet
    if (fleet === null) throw new ControlError(400, 'fleet_not_configured', `mitigation ${id} is a fleet failover, and lifting it needs the fleet section (etcd) in the config`)
    const lifted: FleetEntry = { value: null, reason: actor.reason, requester: actor.requester, at: new Date().toISOString(), ttlMs: null, expiresAt: null, instance: fleet.instance, id }
    const revision = await fleet.write('failovers', upstream, lifted)
    if (!this.watched(revision)) this.rungs.setFleet(upstream, lifted)
    const record = fleetRecord(upstream, lifted)
    this.logger.warn({ event: 'mitigation', action: 'lift', scope: 'fleet', id, mitigation: 'failover', targets: record.targets, reason: actor.reason, requester: actor.requester }, 'fleet failover lifted')
    const persisted = await this.commit({ action: 'mitigation.lift', scope: 'fleet', targets: record.targets, reason: actor.reason, result: 'ok', requester: actor.requester, id, restored: record.targets })
    this.onMitigation('lifted', record)
    return { value: record, persisted }
  }

  /** A fleet failover seen in etcd: in force here (unless a newer local decision stands), audited here. */
  private async fleetFailoverChanged (upstream: string, entry: FleetEntry | null): Promise<void> {
    const applied = this.rungs.setFleet(upstream, entry)
    const fields = { event: 'fleet_override', upstream, to: entry?.value ?? null, id: entry?.id ?? null, reason: entry?.reason, requester: entry?.requester, writer: entry?.instance, expiresAt: entry?.expiresAt ?? null }
    if (!applied) this.logger.warn({ ...fields, event: 'fleet_failover_unknown' }, 'fleet failover names an upstream this sidecar does not have; ignored here')
    else this.logger.warn(fields, entry === null ? `fleet failover of ${upstream} removed` : entry.value === null ? `fleet failover of ${upstream} lifted` : `fleet failover applied: ${upstream} → ${String(entry.value)}`)
    await this.commit({ action: 'fleet.failover', scope: 'fleet', targets: [upstream], reason: entry?.reason ?? 'removed from etcd', result: applied ? 'applied' : 'not_applied', requester: entry?.requester ?? 'etcd', value: entry?.value ?? null, id: entry?.id ?? null, writer: entry?.instance ?? null, expiresAt: entry?.expiresAt ?? null })
  }

  /**
   * What a mitigation that names no target is about, for the audit line of its refusal (SPEC
   * §6: every line says what it was about): a rollback's version (the one this sidecar runs),
   * the kill-switch flags a bare killSwitch looks at, the circuits a bare circuitBreak does.
   */
  impliedTargets (action: string): string[] {
    switch (action) {
      case 'rollback': return [this.config().version]
      case 'killSwitch': return this.circuits.killSwitchFlags()
      case 'circuitBreak': return this.circuits.circuits().map((c) => c.upstream)
      default: return []
    }
  }

  /** A mitigation by id: one of this sidecar's records, or a fleet failover. */
  findMitigation (id: string): MitigationRecord | undefined {
    const found = this.mitigations.find(id)
    if (found !== undefined) return found
    const fleet = this.rungs.findFleet(id)
    return fleet === undefined ? undefined : fleetRecord(fleet.upstream, fleet.entry)
  }

  // ---- mitigations ----

  /**
   * Apply a mitigation. Kill switches and circuit breaks are in force when this resolves; a
   * rollback has started (its record says `running`) and ends in the background.
   */
  async mitigate (req: MitigationRequest): Promise<Applied<MitigationRecord>> {
    if (req.scope === 'fleet') {
      if (req.action === 'failover') return await this.fleetFailover(req)
      throw new ControlError(400, 'bad_request', `"scope": "fleet" applies to failover here, not ${JSON.stringify(req.action)}; for a fleet kill switch or circuit use PUT /v1/flags/:key or PUT /v1/circuits/:upstream with "scope": "fleet"`)
    }
    switch (req.action) {
      case 'killSwitch': {
        const { record, settled } = this.mitigations.killSwitch(req)
        return await this.applied(record, req, settled)
      }
      case 'circuitBreak': {
        const { record, settled } = this.mitigations.circuitBreak(req)
        return await this.applied(record, req, settled)
      }
      case 'rollback': return await this.rollback(req)
      case 'failover': return await this.applied(this.rungs.failover(req), req, Promise.resolve())
      case 'rateLimit': return await this.applied(this.rungs.rateLimit(req), req, Promise.resolve())
      default: throw new ControlError(400, 'bad_request', `action must be one of killSwitch, circuitBreak, rollback, failover, rateLimit (got ${JSON.stringify(req.action)})`)
    }
  }

  private count (record: MitigationRecord): void {
    this.mitigationsTotal.set(record.action, (this.mitigationsTotal.get(record.action) ?? 0) + 1)
  }

  private async applied (record: MitigationRecord, req: MitigationRequest, settled: Promise<void>): Promise<Applied<MitigationRecord>> {
    this.count(record)
    this.logger.warn({ event: 'mitigation', action: record.action, id: record.id, targets: record.targets, ...rungDetails(record), reason: record.reason, source: record.source, requester: req.requester, result: 'applied' }, `mitigation ${record.action} applied`)
    const [persisted] = await Promise.all([
      this.commit({ action: `mitigation.${record.action}`, targets: record.targets, reason: record.reason, result: 'applied', requester: req.requester, id: record.id, source: record.source, ...rungDetails(record) }),
      settled
    ])
    this.onMitigation('applied', record)
    return { value: record, persisted }
  }

  private async rollback (req: MitigationRequest): Promise<Applied<MitigationRecord>> {
    const cfg = this.config()
    this.rollbacks.admit(cfg, this.state)
    const record = this.mitigations.create('rollback', [cfg.version], req)
    record.status = 'running'
    record.finishedAt = null
    record.error = null
    this.mitigations.add(record)
    this.count(record)
    const key = this.rollbacks.start(cfg, record, req.trigger ?? null, async (result) => { await this.rollbackEnded(record, req, result) })
    this.logger.warn({ event: 'mitigation', action: 'rollback', id: record.id, targets: record.targets, reason: record.reason, source: record.source, requester: req.requester, result: 'running', idempotencyKey: key }, 'mitigation rollback started')
    this.onMitigation('started', record)
    // The key is in the audit from the start: a post-mortem names it even if the action never ends.
    const persisted = await this.commit({ action: 'mitigation.rollback', targets: record.targets, reason: record.reason, result: 'running', requester: req.requester, id: record.id, source: record.source, rollbackType: cfg.rollback?.type, idempotencyKey: key })
    return { value: record, persisted }
  }

  private async rollbackEnded (record: MitigationRecord, req: MitigationRequest, result: RollbackResult): Promise<void> {
    record.result = { ...result }
    record.finishedAt = new Date().toISOString()
    if (result.ok) {
      record.status = 'succeeded'
      this.state.rolledBack[record.targets[0] as string] = record.createdAt
    } else {
      record.status = 'failed'
      record.error = `the rollback action failed: ${result.error ?? (result.status !== undefined ? `status ${result.status}` : `exit ${String(result.exitCode ?? '?')}`)}`
    }
    const fields = { event: 'mitigation', action: 'rollback', id: record.id, targets: record.targets, source: record.source, requester: req.requester, result: record.status, attempts: result.attempts, error: record.error }
    if (result.ok) this.logger.warn(fields, 'mitigation rollback succeeded')
    else this.logger.error(fields, 'mitigation rollback failed')
    // Every in-memory view (state, incidents) changes at once; the audit line follows.
    this.onMitigation(result.ok ? 'applied' : 'failed', record)
    await this.commit({ action: 'mitigation.rollback.result', targets: record.targets, reason: record.reason, result: record.status, requester: req.requester, id: record.id, source: record.source, ...auditedOutcome(result), ...(record.error !== null ? { error: record.error } : {}) })
  }

  /** Lift a mitigation: undo exactly what it changed that nobody has changed since. */
  async lift (id: string, actor: Actor): Promise<Applied<MitigationRecord>> {
    const fleet = this.mitigations.find(id) === undefined ? this.rungs.findFleet(id) : undefined
    if (fleet !== undefined) return await this.liftFleetFailover(fleet.upstream, fleet.entry, actor)
    const { record: { record, restored }, settled } = this.mitigations.lift(id, actor)
    restored.push(...this.rungs.release(record))
    this.logger.warn({ event: 'mitigation', action: 'lift', id, mitigation: record.action, targets: record.targets, restored, reason: actor.reason, requester: actor.requester }, `mitigation ${record.action} lifted`)
    const [persisted] = await Promise.all([
      this.commit({ action: 'mitigation.lift', targets: record.targets, reason: actor.reason, result: 'ok', requester: actor.requester, id, restored }),
      settled
    ])
    this.onMitigation('lifted', record)
    return { value: record, persisted }
  }

  /** Overrides and forced circuits with a `ttl` lapse on their own. */
  private async expire (): Promise<void> {
    const now = Date.now()
    const { overrides, circuits, fleet } = this.state
    const before = { flags: { ...overrides }, circuits: { ...circuits }, fleetFlags: { ...fleet.flags }, fleetCircuits: { ...fleet.circuits } }
    const lapsed = this.overrides.lapse(now)
    const ended = this.rungs.lapse(now)
    for (const record of ended) this.onMitigation('lifted', record)
    // What each lapse ended: a local override's mitigation, and a fleet one's. Every sidecar logs
    // and audits the end of a fleet kill switch (its id is the same everywhere, so an incident
    // commander reading any one sidecar sees which fleet action ended); only the sidecar that
    // decided it announces the end, so one fleet action is one notification.
    const lapsedFleet = (entry: FleetEntry | undefined): FleetEntry | undefined => entry !== undefined && expired(entry.expiresAt, now) ? entry : undefined
    const announced: MitigationRecord[] = []
    const entries: AuditInput[] = ended.map((m) => ({ action: 'mitigation.expire', ...(m.scope === 'fleet' ? { scope: 'fleet' } : {}), targets: m.targets, reason: 'ttl expired', result: 'ok', requester: 'breakwater', id: m.id, mitigation: m.action }))
    for (const [kind, names, local, fleetBefore] of [['flags', lapsed.flags, before.flags, before.fleetFlags], ['circuits', lapsed.circuits, before.circuits, before.fleetCircuits]] as const) {
      for (const name of new Set(names)) {
        const localEnded = this.ended(kind === 'flags' ? 'flag' : 'circuit', name, local[name], 'ttl expired')
        const entry = lapsedFleet(fleetBefore[name])
        const fleetEnded = this.fleetEnded(kind, name, entry, 'ttl expired')
        for (const m of fleetEnded) {
          this.logger.warn({ event: 'mitigation', action: 'lift', scope: 'fleet', id: m.id, mitigation: m.action, targets: m.targets, writer: entry?.instance, reason: 'ttl expired' }, `fleet mitigation ${m.action} lifted: its ttl ran out`)
        }
        announced.push(...localEnded, ...(entry?.instance === this.fleet?.instance ? fleetEnded : []))
        entries.push({ action: kind === 'flags' ? 'flag.expire' : 'circuit.expire', ...(entry !== undefined ? { scope: 'fleet', writer: entry.instance } : {}), targets: [name], reason: 'ttl expired', result: 'ok', requester: 'breakwater', ...liftedIds([...localEnded, ...fleetEnded]) })
      }
    }
    await Promise.all([...entries.map(async (e) => await this.commit(e)), lapsed.settled])
    this.announceLifted(announced)
  }

  /** Audit something decided outside a mitigation (a trigger that only notified). */
  async auditEvent (entry: AuditInput): Promise<void> {
    await this.journal.record(entry)
  }

  /**
   * Audit a call refused with `err`, whoever made it (an operator through the API, or a fired
   * trigger): `action: refused`, what it `wanted`, on what `targets`, the error code and status
   * (README "Admin API"), so the audit tells the same story for both.
   */
  async auditRefused (wanted: string, targets: readonly string[], err: ControlError, who: { reason: string, requester: string, trigger?: string }): Promise<void> {
    await this.journal.record({ action: 'refused', targets: [...targets], reason: who.reason, result: err.code, requester: who.requester, wanted, status: err.status, ...(who.trigger !== undefined ? { trigger: who.trigger } : {}) })
  }

  /** Audit a config reload (through the API, or on a signal). */
  async recordReload (actor: Actor, ok: boolean, problems: readonly string[]): Promise<void> {
    if (ok) this.noteConfig()
    await this.commit({ action: 'config.reload', targets: [this.config().source ?? 'config'], reason: actor.reason, result: ok ? 'ok' : 'refused', requester: actor.requester, problems })
  }

  /**
   * Audit a reload refused before the config was read (`draining`: the sidecar is shutting
   * down), through the API (409) or on a signal: a refused call like any other (`refused`,
   * `wanted`, the error code, the API's status), so the audit says who tried and why it did not
   * happen. It changes no state: an audit line only.
   */
  async recordReloadRefused (actor: Actor, code: 'draining', problems: readonly string[]): Promise<void> {
    await this.journal.record({ action: 'refused', wanted: 'config.reload', targets: [this.config().source ?? 'config'], reason: actor.reason, result: code, requester: actor.requester, status: 409, problems })
  }

  /**
   * In force or in progress (kill switches, circuit breaks, running or succeeded rollbacks,
   * failovers and rate limits), fleet failovers included; a failover says where it came from
   * (`origin`: local or fleet) and whether it is the decision in force for its upstream.
   */
  activeMitigations (): Array<MitigationRecord & { origin?: 'local' | 'fleet', inForce?: boolean }> {
    const now = Date.now()
    const list = [...this.mitigations.inForce(), ...this.rungs.fleetRecords(now).filter((m) => m.status === 'active')]
    return list.map((m) => {
      if (m.action !== 'failover') return m
      const origin = m.scope === 'fleet' ? 'fleet' : 'local'
      const decided = this.rungs.failoverInForce(m.targets[0] as string, now)
      const own = origin === 'fleet' ? decided?.origin === 'fleet' : decided?.origin === 'local' && this.rungs.localOwner(m.targets[0] as string) === m
      // The deciding record is not in force while a reload has removed its target (kept for its return).
      return { ...m, origin, inForce: own && this.rungs.failoverApplied(m.targets[0] as string, m.to) }
    })
  }
}

/** Whether an override or forced circuit refuses traffic: a flag forced off, a circuit forced open. */
function refuses (r: OverrideRecord | ForcedCircuitRecord): boolean {
  return 'enabled' in r ? !r.enabled : r.state === 'open'
}

/** `record`, ended now for `reason`. */
function liftedRecord (record: MitigationRecord, reason: string): MitigationRecord {
  record.status = 'lifted'
  record.liftedAt = new Date().toISOString()
  record.liftReason = reason
  return record
}

/** The audit and log field naming the mitigations an action ended, when it ended any. */
function liftedIds (ended: readonly MitigationRecord[]): { lifted?: string[] } {
  return ended.length === 0 ? {} : { lifted: ended.map((m) => m.id) }
}

/** A stable hash of what the config means (not of its file's bytes). */
export function configHash (cfg: Config): string {
  const { source: _source, ...meaning } = cfg
  // Certificates as read from their files (the etcd client's, the tracing CA): a certificate
  // rotated in place is not a config change (triage would name it as a suspect), its paths are.
  return createHash('sha256').update(JSON.stringify(meaning, (key, value: unknown) => key === 'tlsPem' || key === 'caPem' ? undefined : value)).digest('hex').slice(0, 16)
}
