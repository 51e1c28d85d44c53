/**
 * The control plane: flag overrides, forced circuits and mitigations — what the admin API,
 * the CLI and (automatic) triggers do to restore service — each applied at once, persisted in
 * `STATEDIR/state.json` and appended to the audit log before the caller hears back.
 *
 * It acts on the data plane only through small interfaces (set a flag override, force a
 * circuit). If `stateDir` is unwritable, actions still apply in memory and report
 * `persisted: false`; the data plane never needs `stateDir`.
 */
import { randomBytes, createHash } from 'node:crypto'
import type { Logger } from 'pino'
import type { Config } from '../config/types.js'
import type { CircuitState, ForcedState } from '../proxy/circuit-breaker.js'
import type { FlagOrigin } from '../flags/sources.js'
import { StateFile, type PersistedState, type MitigationRecord, type Change, type OverrideRecord, type ForcedCircuitRecord } from '../state/state-file.js'
import { AuditLog, type AuditInput } from '../state/audit-log.js'
import { runRollback, type RollbackResult } from './rollback.js'

/** What the control plane may change in the flags. */
export interface FlagControl {
  override: (key: string, enabled: boolean | null) => Promise<void>
  defines: (key: string) => boolean
  readonly values: ReadonlyMap<string, boolean>
  origin: (key: string) => FlagOrigin | null
}

/** What the control plane may see and change of the circuits. */
export interface CircuitView {
  upstream: string
  state: CircuitState
  automaticState: CircuitState
  forced: ForcedState
  automatic: boolean
  failureRate: number
  windowRequests: number
}

export interface CircuitControl {
  force: (upstream: string, state: ForcedState) => boolean
  circuits: () => CircuitView[]
  upstreams: () => string[]
  /** Flags used as kill switches by routes. */
  killSwitchFlags: () => string[]
}

/** A refusal with its HTTP status and code, for the admin API. */
export class ControlError extends Error {
  constructor (readonly status: number, readonly code: string, message: string, readonly details: Record<string, unknown> = {}) {
    super(message)
  }
}

export interface Actor {
  reason: string
  /** The caller's address, or `trigger:<name>`. */
  requester: string
  /** `operator` or `trigger:<name>`. */
  source: string
}

export interface MitigationRequest extends Actor {
  action: string
  flags?: string[]
  upstreams?: string[]
  /** The trigger's name, for rollbacks fired by one. */
  trigger?: string | null
}

export interface Applied<T> {
  value: T
  persisted: boolean
}

const MAX_KEPT_MITIGATIONS = 200

export class ControlPlane {
  state: PersistedState
  /** Whether the last write to stateDir succeeded. */
  persisted = true
  readonly mitigationsTotal = new Map<string, number>()
  private readonly stateFile: StateFile
  readonly audit: AuditLog
  private ttlTimer: NodeJS.Timeout | null = null
  private queue: Promise<unknown> = Promise.resolve()
  /** Set once start() has run: the version and config first-seen times. */
  versionSince = ''
  configSince = ''

  /** Told about every mitigation applied or lifted (notifications, incidents). */
  onMitigation: (kind: 'applied' | 'lifted', record: MitigationRecord) => void = () => {}

  constructor (
    private readonly config: () => Config,
    private readonly flags: FlagControl,
    private readonly circuits: CircuitControl,
    private readonly logger: Logger
  ) {
    const { stateDir } = config()
    this.stateFile = new StateFile(stateDir)
    this.audit = new AuditLog(stateDir)
    this.state = { version: 1, overrides: {}, circuits: {}, mitigations: [], versions: {}, configs: {}, rolledBack: {} }
  }

  /** Load persisted state and re-apply what is still in force. */
  async start (): Promise<void> {
    const loaded = await this.stateFile.load()
    if (loaded.movedAside !== null) this.logger.error({ event: 'state_corrupt', movedAside: loaded.movedAside, error: loaded.error }, 'state file unreadable; moved aside, starting clean')
    else if (loaded.error !== null) this.logger.error({ event: 'state_unreadable', error: loaded.error }, 'state file unreadable; starting clean')
    this.state = loaded.state
    const now = Date.now()
    for (const [key, o] of Object.entries(this.state.overrides)) {
      if (expired(o.expiresAt, now) || !this.flags.defines(key)) { delete this.state.overrides[key]; continue }
      await this.flags.override(key, o.enabled)
      this.logger.warn({ event: 'override_active', flag: key, enabled: o.enabled, reason: o.reason, since: o.at, expiresAt: o.expiresAt }, 'flag override in force')
    }
    for (const [upstream, c] of Object.entries(this.state.circuits)) {
      if (expired(c.expiresAt, now) || !this.circuits.force(upstream, c.state)) { delete this.state.circuits[upstream]; continue }
      this.logger.warn({ event: 'override_active', upstream, forced: c.state, reason: c.reason, since: c.at, expiresAt: c.expiresAt }, 'forced circuit in force')
    }
    this.noteConfig()
    await this.save()
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

  stop (): void {
    if (this.ttlTimer !== null) clearInterval(this.ttlTimer)
    this.ttlTimer = null
  }

  /** Run mutations one at a time: each reads the state the previous one left. */
  private async serial<T> (fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn)
    this.queue = run.catch(() => {})
    return await run
  }

  private async save (): Promise<boolean> {
    try {
      await this.stateFile.save(this.state)
      if (!this.persisted) this.logger.info({ event: 'state_persisted' }, 'state file writable again')
      this.persisted = true
    } catch (err) {
      if (this.persisted) this.logger.warn({ event: 'state_not_persisted', error: (err as Error).message }, 'cannot write the state file; admin actions apply in memory only')
      this.persisted = false
    }
    return this.persisted
  }

  private async record (entry: AuditInput): Promise<boolean> {
    try {
      await this.audit.append({ time: new Date().toISOString(), ...entry })
      return true
    } catch (err) {
      this.logger.warn({ event: 'audit_not_persisted', error: (err as Error).message, action: entry.action }, 'cannot append to the audit log')
      return false
    }
  }

  /** Persist state and audit the action; returns whether both reached the disk. */
  private async commit (entry: AuditInput): Promise<boolean> {
    const saved = await this.save()
    const audited = await this.record(entry)
    return saved && audited
  }

  // ---- flags ----

  async setFlag (key: string, enabled: boolean, actor: Actor, ttlMs: number | null): Promise<Applied<OverrideRecord>> {
    return await this.serial(async () => {
      if (!this.flags.defines(key)) throw new ControlError(404, 'unknown_flag', `flag "${key}" is not defined by featureFlags or the flag file`)
      const record: OverrideRecord = { enabled, reason: actor.reason, source: actor.source, at: new Date().toISOString(), expiresAt: ttlMs === null ? null : new Date(Date.now() + ttlMs).toISOString() }
      this.state.overrides[key] = record
      await this.flags.override(key, enabled)
      this.logger.warn({ event: 'mitigation', action: 'flag_override', flag: key, enabled, reason: actor.reason, requester: actor.requester, expiresAt: record.expiresAt }, enabled ? 'flag forced on' : 'flag forced off')
      const persisted = await this.commit({ action: 'flag.override', targets: [key], reason: actor.reason, result: 'ok', requester: actor.requester, enabled, expiresAt: record.expiresAt })
      // Switching a feature off is a mitigation, whichever door it came through: verify it.
      if (!enabled) this.onMitigation('applied', this.operatorRecord('killSwitch', key, actor))
      return { value: record, persisted }
    })
  }

  async clearFlag (key: string, actor: Actor): Promise<Applied<{ enabled: boolean }>> {
    return await this.serial(async () => {
      if (!this.flags.defines(key) && this.state.overrides[key] === undefined) throw new ControlError(404, 'unknown_flag', `flag "${key}" is not defined by featureFlags or the flag file`)
      const had = this.state.overrides[key] !== undefined
      delete this.state.overrides[key]
      await this.flags.override(key, null)
      const enabled = this.flags.values.get(key) !== false
      this.logger.warn({ event: 'mitigation', action: 'flag_override_dropped', flag: key, enabled, reason: actor.reason, requester: actor.requester }, 'flag override dropped')
      const persisted = await this.commit({ action: 'flag.clear', targets: [key], reason: actor.reason, result: had ? 'ok' : 'no_override', requester: actor.requester, enabled })
      return { value: { enabled }, persisted }
    })
  }

  // ---- circuits ----

  async setCircuit (upstream: string, state: 'open' | 'closed' | 'auto', actor: Actor, ttlMs: number | null): Promise<Applied<CircuitView>> {
    return await this.serial(async () => {
      if (!this.circuits.upstreams().includes(upstream)) throw new ControlError(404, 'unknown_upstream', `upstream "${upstream}" is not configured`)
      this.circuits.force(upstream, state === 'auto' ? null : state)
      if (state === 'auto') delete this.state.circuits[upstream]
      else this.state.circuits[upstream] = { state, reason: actor.reason, source: actor.source, at: new Date().toISOString(), expiresAt: ttlMs === null ? null : new Date(Date.now() + ttlMs).toISOString() }
      this.logger.warn({ event: 'mitigation', action: 'circuit_forced', upstream, state, reason: actor.reason, requester: actor.requester }, `circuit ${state === 'auto' ? 'handed back to automatic' : `forced ${state}`}`)
      const persisted = await this.commit({ action: 'circuit.force', targets: [upstream], reason: actor.reason, result: 'ok', requester: actor.requester, state })
      if (state === 'open') this.onMitigation('applied', this.operatorRecord('circuitBreak', upstream, actor))
      return { value: this.circuitView(upstream), persisted }
    })
  }

  private circuitView (upstream: string): CircuitView {
    return this.circuits.circuits().find((c) => c.upstream === upstream) ?? { upstream, state: 'closed', automaticState: 'closed', forced: null, automatic: false, failureRate: 0, windowRequests: 0 }
  }

  // ---- mitigations ----

  async mitigate (req: MitigationRequest): Promise<Applied<MitigationRecord>> {
    return await this.serial(async () => {
      switch (req.action) {
        case 'killSwitch': return await this.killSwitch(req)
        case 'circuitBreak': return await this.circuitBreak(req)
        case 'rollback': return await this.rollback(req)
        default: throw new ControlError(400, 'bad_request', `action must be one of killSwitch, circuitBreak, rollback (got ${JSON.stringify(req.action)})`)
      }
    })
  }

  /**
   * Operator actions win over triggers (SPEC §14): a trigger leaves alone every target an
   * operator has already set, whichever way.
   */
  private operatorWins (req: MitigationRequest, targets: string[], sourceOf: (target: string) => string | undefined): string[] {
    if (!req.source.startsWith('trigger:')) return targets
    const free = targets.filter((t) => {
      const set = this.state.overrides[t] !== undefined || this.state.circuits[t] !== undefined
      const source = sourceOf(t)
      return !set || (source !== undefined && source !== 'operator' && source.startsWith('trigger:'))
    })
    if (free.length === 0) throw new ControlError(409, 'operator_override', `an operator already decided for ${targets.join(', ')}; the trigger leaves it alone`)
    return free
  }

  /** A record for a mitigation done by a direct flag or circuit call (not kept in the list). */
  private operatorRecord (action: 'killSwitch' | 'circuitBreak', target: string, actor: Actor): MitigationRecord {
    return this.newRecord(action, [target], actor, `${action === 'killSwitch' ? 'flag' : 'circuit'}:${target}@${Date.now().toString(36)}`)
  }

  private newRecord (action: MitigationRecord['action'], targets: string[], req: Actor, id = `m-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`): MitigationRecord {
    return {
      id,
      action,
      targets,
      reason: req.reason,
      source: req.source,
      createdAt: new Date().toISOString(),
      status: 'active',
      liftedAt: null,
      liftReason: null,
      changes: [],
      result: null
    }
  }

  private async killSwitch (req: MitigationRequest): Promise<Applied<MitigationRecord>> {
    let targets: string[]
    if (req.flags !== undefined && req.flags.length > 0) {
      const unknown = req.flags.filter((f) => !this.flags.defines(f))
      if (unknown.length > 0) throw new ControlError(404, 'unknown_flag', `unknown flag(s): ${unknown.join(', ')}`)
      targets = [...new Set(req.flags)]
    } else {
      targets = this.circuits.killSwitchFlags().filter((f) => this.flags.values.get(f) !== false)
      if (targets.length === 0) throw new ControlError(409, 'nothing_to_mitigate', 'no enabled flag is used as a kill switch by a route')
    }
    targets = this.operatorWins(req, targets, (key) => this.state.overrides[key]?.source)
    const record = this.newRecord('killSwitch', targets, req)
    for (const key of targets) {
      record.changes.push({ kind: 'flag', target: key, before: this.state.overrides[key] ?? null })
      this.state.overrides[key] = { enabled: false, reason: req.reason, source: req.source, at: record.createdAt, expiresAt: null }
      await this.flags.override(key, false)
    }
    return await this.finish(record, req)
  }

  private async circuitBreak (req: MitigationRequest): Promise<Applied<MitigationRecord>> {
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
    targets = this.operatorWins(req, targets, (upstream) => this.state.circuits[upstream]?.source)
    const record = this.newRecord('circuitBreak', targets, req)
    for (const upstream of targets) {
      record.changes.push({ kind: 'circuit', target: upstream, before: this.state.circuits[upstream] ?? null })
      this.state.circuits[upstream] = { state: 'open', reason: req.reason, source: req.source, at: record.createdAt, expiresAt: null }
      this.circuits.force(upstream, 'open')
    }
    return await this.finish(record, req)
  }

  private async rollback (req: MitigationRequest): Promise<Applied<MitigationRecord>> {
    const cfg = this.config()
    const rollback = cfg.rollback
    if (rollback === null) throw new ControlError(409, 'rollback_not_configured', 'no rollback action is configured (config key rollback)')
    if (this.state.rolledBack[cfg.version] !== undefined) {
      throw new ControlError(409, 'already_rolled_back', `version ${cfg.version} was already rolled back at ${this.state.rolledBack[cfg.version] as string}`)
    }
    const last = this.state.mitigations.filter((m) => m.action === 'rollback' && m.result?.ok === true).at(-1)
    if (last !== undefined) {
      const readyAt = Date.parse(last.createdAt) + rollback.cooldownMs
      if (Date.now() < readyAt) throw new ControlError(409, 'rollback_cooldown', `a rollback ran at ${last.createdAt}; the next is allowed after ${new Date(readyAt).toISOString()}`, { retryAfterSeconds: Math.ceil((readyAt - Date.now()) / 1000) })
    }
    const record = this.newRecord('rollback', [cfg.version], req)
    const result: RollbackResult = await runRollback(rollback, { service: cfg.service, version: cfg.version, trigger: req.trigger ?? null, reason: req.reason })
    record.result = { ...result }
    if (result.ok) this.state.rolledBack[cfg.version] = record.createdAt
    else record.status = 'lifted'
    const applied = await this.finish(record, req)
    if (!result.ok) throw new ControlError(502, 'rollback_failed', `the rollback action failed: ${result.error ?? `status ${result.status ?? result.exitCode ?? '?'}`}`, { mitigation: record, persisted: applied.persisted })
    return applied
  }

  private async finish (record: MitigationRecord, req: MitigationRequest): Promise<Applied<MitigationRecord>> {
    this.state.mitigations.push(record)
    this.trim()
    this.mitigationsTotal.set(record.action, (this.mitigationsTotal.get(record.action) ?? 0) + 1)
    this.logger.warn({ event: 'mitigation', action: record.action, id: record.id, targets: record.targets, reason: record.reason, source: record.source, requester: req.requester, result: record.result?.ok === false ? 'failed' : 'applied' }, `mitigation ${record.action} applied`)
    const persisted = await this.commit({ action: `mitigation.${record.action}`, targets: record.targets, reason: record.reason, result: record.result?.ok === false ? 'failed' : 'applied', requester: req.requester, id: record.id, source: record.source })
    if (record.result?.ok !== false) this.onMitigation('applied', record)
    return { value: record, persisted }
  }

  private trim (): void {
    const m = this.state.mitigations
    while (m.length > MAX_KEPT_MITIGATIONS) {
      const i = m.findIndex((r) => r.status !== 'active')
      if (i === -1) break
      m.splice(i, 1)
    }
  }

  /** Lift a mitigation: undo exactly what it changed that nobody has changed since. */
  async lift (id: string, actor: Actor): Promise<Applied<MitigationRecord>> {
    return await this.serial(async () => {
      const record = this.state.mitigations.find((m) => m.id === id)
      if (record === undefined) throw new ControlError(404, 'unknown_mitigation', `no mitigation with id "${id}"`)
      if (record.status !== 'active') throw new ControlError(409, 'not_active', `mitigation ${id} was already lifted at ${record.liftedAt ?? '?'}`)
      const restored: string[] = []
      for (const change of [...record.changes].reverse()) {
        if (await this.undo(change, record)) restored.push(change.target)
      }
      record.status = 'lifted'
      record.liftedAt = new Date().toISOString()
      record.liftReason = actor.reason
      this.logger.warn({ event: 'mitigation', action: 'lift', id, mitigation: record.action, targets: record.targets, restored, reason: actor.reason, requester: actor.requester }, `mitigation ${record.action} lifted`)
      const persisted = await this.commit({ action: 'mitigation.lift', targets: record.targets, reason: actor.reason, result: 'ok', requester: actor.requester, id, restored })
      this.onMitigation('lifted', record)
      return { value: record, persisted }
    })
  }

  private async undo (change: Change, record: MitigationRecord): Promise<boolean> {
    if (change.kind === 'flag') {
      const now = this.state.overrides[change.target]
      // Someone changed it since: their action stands.
      if (now === undefined || now.enabled !== false || now.at !== record.createdAt) return false
      const before = change.before as OverrideRecord | null
      if (before === null) {
        delete this.state.overrides[change.target]
        await this.flags.override(change.target, null)
      } else {
        this.state.overrides[change.target] = before
        await this.flags.override(change.target, before.enabled)
      }
      return true
    }
    const now = this.state.circuits[change.target]
    if (now === undefined || now.state !== 'open' || now.at !== record.createdAt) return false
    const before = change.before as ForcedCircuitRecord | null
    if (before === null) {
      delete this.state.circuits[change.target]
      this.circuits.force(change.target, null)
    } else {
      this.state.circuits[change.target] = before
      this.circuits.force(change.target, before.state)
    }
    return true
  }

  /** Overrides and forced circuits with a `ttl` lapse on their own. */
  private async expire (): Promise<void> {
    const now = Date.now()
    const flags = Object.entries(this.state.overrides).filter(([, o]) => expired(o.expiresAt, now)).map(([k]) => k)
    const circuits = Object.entries(this.state.circuits).filter(([, c]) => expired(c.expiresAt, now)).map(([k]) => k)
    if (flags.length === 0 && circuits.length === 0) return
    await this.serial(async () => {
      for (const key of flags) {
        delete this.state.overrides[key]
        await this.flags.override(key, null)
        this.logger.warn({ event: 'mitigation', action: 'override_expired', flag: key }, 'flag override expired')
        await this.record({ action: 'flag.expire', targets: [key], reason: 'ttl expired', result: 'ok', requester: 'breakwater' })
      }
      for (const upstream of circuits) {
        delete this.state.circuits[upstream]
        this.circuits.force(upstream, null)
        this.logger.warn({ event: 'mitigation', action: 'override_expired', upstream }, 'forced circuit expired')
        await this.record({ action: 'circuit.expire', targets: [upstream], reason: 'ttl expired', result: 'ok', requester: 'breakwater' })
      }
      await this.save()
    })
  }

  /** Audit something decided outside a mitigation (a trigger that only notified). */
  async auditEvent (entry: AuditInput): Promise<void> {
    await this.record(entry)
  }

  /** Audit a config reload requested through the API. */
  async recordReload (actor: Actor, ok: boolean, problems: readonly string[]): Promise<void> {
    if (ok) this.noteConfig()
    await this.save()
    await this.record({ action: 'config.reload', targets: [this.config().source ?? 'config'], reason: actor.reason, result: ok ? 'ok' : 'refused', requester: actor.requester, problems })
  }

  activeMitigations (): MitigationRecord[] {
    return this.state.mitigations.filter((m) => m.status === 'active')
  }
}

function expired (at: string | null, now: number): boolean {
  return at !== null && Date.parse(at) <= now
}

/** A stable hash of what the config means (not of its file's bytes). */
export function configHash (cfg: Config): string {
  const { source: _source, ...meaning } = cfg
  return createHash('sha256').update(JSON.stringify(meaning)).digest('hex').slice(0, 16)
}
