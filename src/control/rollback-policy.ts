/**
 * When a rollback may run, and running it in the background (SPEC §7, §14, §15).
 *
 * - A rollback needs a configured action, a version not rolled back before, and the cooldown
 *   since the last successful one to have passed.
 * - Two rollbacks never run at once: while one runs, another is **refused** (409
 *   `rollback_in_progress`, naming the running one) rather than joined — the running one
 *   already targets the only version this sidecar runs, and a refusal tells a trigger or an
 *   operator plainly what is going on.
 * - The action (webhook or exec) runs beside the control plane, never in an operator's way:
 *   its record goes `running` → `succeeded` | `failed` (with the reason) when it ends.
 */
import type { Config } from '../config/types.js'
import type { MitigationRecord, PersistedState } from '../state/state-file.js'
import { ControlError } from './interfaces.js'
import { idempotencyKey, runRollback, type RollbackResult } from './rollback.js'

interface Running {
  record: MitigationRecord
  abort: AbortController
  done: Promise<void>
}

export class RollbackPolicy {
  private running: Running | null = null

  /** Throws a ControlError when a rollback may not start now. */
  admit (cfg: Config, state: PersistedState, now = Date.now()): void {
    const rollback = cfg.rollback
    if (rollback === null) throw new ControlError(409, 'rollback_not_configured', 'no rollback action is configured (config key rollback)')
    if (this.running !== null) {
      throw new ControlError(409, 'rollback_in_progress', `rollback ${this.running.record.id} of version ${this.running.record.targets.join(', ')} is still running; follow it in GET /v1/state`, { mitigation: this.running.record })
    }
    if (state.rolledBack[cfg.version] !== undefined) {
      throw new ControlError(409, 'already_rolled_back', `version ${cfg.version} was already rolled back at ${state.rolledBack[cfg.version] as string}`)
    }
    const last = state.mitigations.filter((m) => m.action === 'rollback' && (m.status === 'succeeded' || (m.status === 'lifted' && m.result?.ok === true))).at(-1)
    if (last !== undefined) {
      const readyAt = Date.parse(last.createdAt) + rollback.cooldownMs
      if (now < readyAt) throw new ControlError(409, 'rollback_cooldown', `a rollback ran at ${last.createdAt}; the next is allowed after ${new Date(readyAt).toISOString()}`, { retryAfterSeconds: Math.ceil((readyAt - now) / 1000) })
    }
  }

  /**
   * Run the configured action for `record` (status `running`) in the background; `settle` is
   * called once with its result and may persist it. Call `admit` first. Returns the action's
   * idempotency key (null when no action is configured), known before it runs.
   */
  start (cfg: Config, record: MitigationRecord, trigger: string | null, settle: (result: RollbackResult) => Promise<void>): string | null {
    const rollback = cfg.rollback
    if (rollback === null) return null
    const abort = new AbortController()
    const request = { service: cfg.service, version: cfg.version, trigger, reason: record.reason }
    const key = idempotencyKey(request)
    const done = runRollback(rollback, request, { signal: abort.signal, stateDir: cfg.stateDir })
      .catch((err: unknown): RollbackResult => ({ ok: false, type: rollback.type, idempotencyKey: key, attempts: 0, error: (err as Error).message }))
      .then(async (result) => {
        this.running = null
        await settle(result)
      })
    this.running = { record, abort, done }
    return key
  }

  /** The rollback running now, if any. */
  current (): MitigationRecord | null {
    return this.running?.record ?? null
  }

  /** Stop waiting for a running action (the sidecar stops); resolves once its record is settled. */
  async stop (): Promise<void> {
    const r = this.running
    if (r === null) return
    r.abort.abort(new Error('the sidecar is stopping'))
    await r.done
  }
}
