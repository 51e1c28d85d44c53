/**
 * The control plane's write path: each commit writes the state file, then appends its audit
 * line, one commit after another in the order they were made, each on disk before its caller
 * hears back (SPEC §6). Only disk writes go through here — never a rollback action or a
 * notification — so an operator's answer waits for at most a few fsyncs (STYLE 17).
 *
 * If `stateDir` is unwritable, commits report `false` and the caller answers
 * `"persisted": false`; nothing else changes (SPEC §14).
 */
import type { Logger } from 'pino'
import { StateFile, type PersistedState } from './state-file.js'
import { AuditLog, type AuditInput } from './audit-log.js'

export class Journal {
  readonly stateFile: StateFile
  readonly audit: AuditLog
  /** Whether the last write of the state file succeeded. */
  persisted = true
  private queue: Promise<unknown> = Promise.resolve()

  constructor (stateDir: string, private readonly logger: Logger) {
    this.stateFile = new StateFile(stateDir)
    this.audit = new AuditLog(stateDir)
  }

  /**
   * Persist `state` as it is now and append `entry` (when given); resolves with whether both
   * reached the disk.
   */
  async commit (state: PersistedState, entry: AuditInput | null): Promise<boolean> {
    // The snapshot is taken now, in call order; the write happens in turn.
    const text = StateFile.serialise(state)
    const line = entry === null ? null : { time: new Date().toISOString(), ...entry }
    const run = this.queue.then(async () => {
      const saved = await this.save(text)
      const audited = line === null || await this.append(line)
      return saved && audited
    })
    this.queue = run.catch(() => {})
    return await run
  }

  /** Append an audit line that changes no state (a trigger that only notified). */
  async record (entry: AuditInput): Promise<boolean> {
    const line = { time: new Date().toISOString(), ...entry }
    const run = this.queue.then(async () => await this.append(line))
    this.queue = run.catch(() => {})
    return await run
  }

  /** Resolves once every commit made so far is written (or has failed). */
  async flushed (): Promise<void> {
    await this.queue
  }

  private async save (text: string): Promise<boolean> {
    try {
      await this.stateFile.write(text)
      if (!this.persisted) this.logger.info({ event: 'state_persisted' }, 'state file writable again')
      this.persisted = true
    } catch (err) {
      if (this.persisted) this.logger.warn({ event: 'state_not_persisted', error: (err as Error).message, code: (err as NodeJS.ErrnoException).code, path: this.stateFile.path }, 'cannot write the state file; admin actions apply in memory only, and the state file keeps the last state written')
      this.persisted = false
    }
    return this.persisted
  }

  private async append (entry: AuditInput & { time: string }): Promise<boolean> {
    try {
      await this.audit.append(entry)
      return true
    } catch (err) {
      this.logger.warn({ event: 'audit_not_persisted', error: (err as Error).message, action: entry.action }, 'cannot append to the audit log')
      return false
    }
  }
}
