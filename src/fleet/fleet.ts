/**
 * The fleet layer on etcd (SPEC §16), loaded only when `fleet` is configured (STYLE 18): this
 * module and the etcd client are `await import()`ed by the sidecar, never imported statically.
 *
 * Keys under `{prefix}/{service}/`:
 * - `flags/{key}`, `circuits/{upstream}`, `failovers/{upstream}`: fleet overrides, JSON `{value,
 *   reason, requester, at, ttlMs, expiresAt, instance}` (a failover's value is its target
 *   upstream, and it carries its mitigation `id`). A `ttl` is an expiry timestamp, not an etcd lease: a lease
 *   lives in etcd, so a sidecar cut off from etcd would keep a kill switch past its ttl; a
 *   timestamp lapses on every sidecar by its own clock, etcd reachable or not.
 * - `incidents/{incidentKey}`: who acts for one incident (see `claim`), under its lease, and
 *   how far it got (acted, escalated, restored, its status page incident: see `progress`),
 *   which the followers record.
 *
 * etcd is never on the request path: every sidecar reads its folders (`flags/`, `circuits/`,
 * `failovers/`, `incidents/`: never the rest of the prefix) at one revision, applies
 * it to the same in-memory overrides the data plane reads, and watches from revision + 1. A
 * probe re-reads those folders every few seconds (through `call`, as writes go: a member just lost
 * or an election is retried, not taken for a lost etcd): if it fails the sidecar is disconnected; if it
 * shows what the watch did not deliver (a stalled watch), the read is applied and the watch
 * restarted. While disconnected the last fleet state stays in force (and in `stateDir`), and
 * the sidecar retries with backoff, logging once per change of state, not per retry.
 */
import { randomBytes } from 'node:crypto'
import type { Logger } from 'pino'
import type { Etcd, KeyValue, Lease } from './etcd.js'
import type { FleetConfig } from '../config/types.js'
import type { FleetEntry, FleetState } from '../state/state-file.js'
import { ControlError, type FleetWriter } from '../control/interfaces.js'

/** The kinds of fleet override, each a folder under the prefix. */
export type Kind = 'flags' | 'circuits' | 'failovers'
const KINDS: readonly Kind[] = ['flags', 'circuits', 'failovers']

/** Who acts for one incident (SPEC §16). */
export interface Claim {
  leader: boolean
  /** The instance holding the incident key. */
  holder: string
  /** Whether the incident's `trigger_fired` was delivered already (by a holder before this one). */
  announced: boolean
  /** The receivers that took the incident's `trigger_fired` from a holder before this one (`Holding.announcedTo`). */
  announcedTo: string[]
  /** The fleet's id of the incident (`Holding.incident`); absent on a key written without one. */
  incident?: string
}

/** The value of `{prefix}/{service}/incidents/{incidentKey}`: who acts, and how far it got. */
export interface Holding {
  instance: string
  trigger: string
  at: string
  /** Whether the holder's action succeeded: nobody takes over then. */
  acted: boolean
  /**
   * The fleet's id of this incident: written by its first holder (its local incident id), carried
   * by every successor, so that a successor's notifications name the incident as the leader's did
   * (the webhook `Idempotency-Key`), and a later incident of the same key is told apart.
   */
  incident?: string
  /** When the holder's `trigger_fired` was delivered on every channel: a taker-over does not announce the incident again. */
  announcedAt?: string
  /**
   * The receivers (`receiverName`: `slack`, `pagerduty`, `webhook:<digest>`) that took the
   * holder's `trigger_fired`, each added as it does: a taker-over with no `announcedAt` announces
   * the incident only to the others, never twice to one.
   */
  announcedTo?: string[]
  /** When the holder escalated the incident (the fleet escalates once: followers record it, a taker-over does not escalate again). */
  escalatedAt?: string
  /** When the holder verified restoration (followers record the incident restored). */
  restoredAt?: string
  /** The status page incident the holder created and the last status it sent: a taker-over updates it, never creates a second. */
  statusPage?: { id: string, status: string, round?: number }
}

/** What the holder of an incident key reports as it goes. */
export type Progress = Partial<Pick<Holding, 'acted' | 'incident' | 'announcedAt' | 'announcedTo' | 'escalatedAt' | 'restoredAt' | 'statusPage'>>

export interface FleetDeps {
  service: string
  instance: string
  logger: Logger
  /** The fleet state as last applied (persisted with the rest of the control-plane state). */
  state: () => FleetState
  /** Apply one changed fleet override (and audit and persist it). */
  changed: (kind: Kind, name: string, entry: FleetEntry | null) => Promise<void>
}

/** One attempt on one member; a member that does not answer in time is left for another. */
const ATTEMPT_MS = 1000
/** The whole call, retries on other members included. */
const CALL_TIMEOUT_MS = 4000
/**
 * A sign-in to an etcd with authentication: etcd's bcrypt check of the password may take more
 * than an attempt on a busy CPU, and is not the member being away. It leaves the call an attempt.
 */
const SIGN_IN_MS = CALL_TIMEOUT_MS - ATTEMPT_MS
const BACKOFF_MIN_MS = 200
const BACKOFF_MAX_MS = 5000

export class Fleet implements FleetWriter {
  /** Whether the watch is live and etcd answered the last probe. */
  connected = false
  /** Values under the prefix that could not be read (ignored). */
  corruptTotal = 0
  /** Since when, and why, etcd is unreachable (null while connected, or still trying at start). */
  lost: { since: string, error: string } | null = null
  readonly instance: string
  readonly root: string
  private readonly probeMs: number
  private stopped = false
  private watcher: { cancel: () => void } | null = null
  private wake: (() => void) | null = null
  private running: Promise<void> = Promise.resolve()
  /** Whether the disconnected state was logged already (once per change of state). */
  private reported: boolean | null = null
  /** Corrupt keys already warned about, by key and revision. */
  private readonly corruptSeen = new Set<string>()
  private applying: Promise<void> = Promise.resolve()
  /** This sidecar's lease: its incident keys live only as long as it keeps the lease alive. */
  private lease: Lease | null = null
  /** Incident keys as last seen (watch and resyncs), by incident key. */
  private readonly incidents = new Map<string, Holding>()
  /** The etcd revision of each value in `incidents`: a read older than it cannot say it is gone. */
  private readonly incidentRevisions = new Map<string, number>()
  /** `progress` writes, one at a time: each compares against the value the one before wrote. */
  private progressing: Promise<void> = Promise.resolve()
  /** Called when an incident's holder went away (its lease expired, or it stopped) before restoration was verified, with the key as last seen. */
  onIncidentReleased: (incidentKey: string, last: Holding) => void = () => {}
  /**
   * Called when this sidecar held an incident key, before restoration was verified, and no longer
   * does: etcd says its lease expired (the process frozen or starved past the ttl), its key is gone,
   * or another sidecar holds it now. With the key as this sidecar last held it.
   */
  onIncidentLost: (incidentKey: string, last: Holding) => void = () => {}
  /** Incidents this sidecar stopped acting for because it lost their key (`onIncidentLost`), counted by the sidecar. */
  stepDownsTotal = 0
  /** Called when another sidecar holding an incident key reports escalation, verified restoration or its status page incident. */
  onIncidentProgress: (incidentKey: string, holding: Holding) => void = () => {}

  private constructor (readonly client: Etcd, readonly config: FleetConfig, private readonly deps: FleetDeps, private readonly recoverable: (err: Error) => boolean) {
    this.instance = deps.instance
    this.root = `${config.etcd.prefix}/${deps.service}/`
    this.probeMs = Math.max(500, Math.min(2000, Math.floor(config.leaseTtlMs / 4)))
  }

  /** Load the etcd client and connect in the background; never waits for etcd. */
  static async start (config: FleetConfig, deps: FleetDeps): Promise<Fleet> {
    const { Etcd, recoverable } = await import('./etcd.js')
    const { etcd } = config
    const client = new Etcd({ endpoints: etcd.endpoints, username: etcd.username, password: etcd.password, tls: etcd.tlsPem, attemptMs: ATTEMPT_MS, signInMs: SIGN_IN_MS })
    const fleet = new Fleet(client, config, deps, recoverable)
    fleet.running = fleet.run()
    return fleet
  }

  key (kind: Kind | 'incidents', name: string): string {
    return `${this.root}${kind}/${name}`
  }

  // ---- writes ----

  /**
   * An operator's fleet override. Operators never wait (SPEC §15): it is tried again only while
   * the cluster may be electing (a lost member, a new leader: a second or two), that is while
   * a member answers so, or, with more than one member, holds the call without an answer.
   * Members that refuse the connection are never waited for, nor is a lone member that does not
   * answer: the operator hears 503 at once, or after one attempt, with the local action theirs.
   */
  async write (kind: Kind, name: string, entry: FleetEntry): Promise<number> {
    if (!this.connected) throw unavailable('etcd is unreachable')
    try {
      const cluster = this.config.etcd.endpoints.length > 1
      const electing = (err: Error): boolean => {
        const e = err as { answered?: boolean, silent?: boolean }
        return this.recoverable(err) && (e.answered === true || (cluster && e.silent === true))
      }
      return await this.call(async () => await this.client.put(this.key(kind, name), JSON.stringify(entry)), electing)
    } catch (err) {
      throw unavailable((err as Error).message)
    }
  }

  // ---- one incident, one actor ----

  /**
   * Become the one sidecar that acts for `incidentKey`, or learn who is: the key is created
   * in a transaction (only if absent) under this sidecar's lease. Throws when etcd does not
   * answer (the caller then acts alone). A successor creates it with what its previous holder
   * had recorded (`carried`), in the same write: it never exists saying less. A first holder names
   * the incident by `local` (its own incident id), else by a new id.
   */
  async claim (incidentKey: string, trigger: string, carried: Progress = {}, local?: string): Promise<Claim> {
    const key = this.key('incidents', incidentKey)
    const incident = carried.incident ?? local ?? `f-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`
    const holding = holdingOf({ acted: false, ...carried, incident, instance: this.instance, trigger, at: new Date().toISOString() })
    // Retrying is safe: a create that did land makes the retry read this sidecar as the holder.
    const res = await this.call(async () => await this.client.txn([{ key, target: 'CREATE', createRevision: 0 }], [{ key, value: JSON.stringify(holding), lease: await this.leaseId() }], key))
    if (res.succeeded) {
      this.hold(incidentKey, holding, res.revision)
      return { leader: true, holder: this.instance, announced: holding.announcedAt !== undefined, announcedTo: holding.announcedTo ?? [], incident }
    }
    const kv = res.kvs[0]
    const holder = kv === undefined ? null : readHolding(kv.value)
    if (kv === undefined || holder === null) throw new Error(`unreadable incident key ${key}`)
    if (holder.instance === this.instance) await this.holdAgain(key, kv)
    this.seen(incidentKey, holder, kv.modRevision)
    return { leader: holder.instance === this.instance, holder: holder.instance, announced: holder.announcedAt !== undefined, announcedTo: holder.announcedTo ?? [], ...(holder.incident !== undefined ? { incident: holder.incident } : {}) }
  }

  /**
   * This sidecar's incident key from before a restart lives under the lease of the process that
   * was, and goes when that lease expires: hold it under this one's instead (unless it changed).
   */
  private async holdAgain (key: string, kv: KeyValue): Promise<void> {
    const lease = await this.leaseId()
    if (kv.lease === lease) return
    await this.call(async () => await this.client.txn([{ key, target: 'MOD', modRevision: kv.modRevision }], [{ key, value: kv.value, lease }]))
  }

  /** The incident key as it is in etcd now, null when absent. Throws when etcd does not answer. */
  async read (incidentKey: string): Promise<Holding | null> {
    const res = await this.call(async () => await this.client.range(this.key('incidents', incidentKey)))
    const kv = res.kvs[0]
    const holding = kv === undefined ? null : readHolding(kv.value)
    if (kv !== undefined && holding !== null) this.seen(incidentKey, holding, kv.modRevision)
    return holding
  }

  /** The incident key as last seen (watch and resyncs). */
  holding (incidentKey: string): Holding | undefined {
    return this.incidents.get(incidentKey)
  }

  /**
   * Whether this sidecar may act as the holder of `incidentKey` now: never on a lease it cannot
   * prove it still holds (SPEC §16; Kubernetes' and etcd's elections alike). Its own clock proves
   * it when the lease was kept alive lately; else etcd is asked (a promise): a lease etcd says
   * expired is lost (`onIncidentLost` told first), and false. When etcd does not answer, or the
   * lease was lost for etcd being unreachable, this sidecar acts alone, as when etcd does not
   * answer a claim.
   */
  leads (incidentKey: string): boolean | Promise<boolean> {
    const held = this.incidents.get(incidentKey)
    if (held !== undefined && held.instance !== this.instance) return false
    const lease = this.lease
    if (lease === null || lease.fresh()) return true
    return lease.confirm().catch(() => true)
  }

  /**
   * The holder's incident moved on (its action succeeded, it escalated, restoration was
   * verified): record it on the key, so nobody takes over to act or escalate again, and the
   * followers' records follow. A no-op unless this sidecar holds the key. Writes go one at a
   * time: two at once would both compare against the same value, and the second would fail.
   * `announcedTo` adds to the receivers recorded already.
   */
  async progress (incidentKey: string, change: Progress): Promise<void> {
    const write = this.progressing.then(async () => {
      const key = this.key('incidents', incidentKey)
      // Twice at most: a compare that fails (etcd holds a value other than the one kept here)
      // answers with what etcd holds, and the second write goes over that while it is still this
      // sidecar's — never over a new holder's.
      let found: { holding: Holding, text: string } | null = null
      for (let attempt = 0; attempt < 2; attempt++) {
        const held: Holding | undefined = found?.holding ?? this.incidents.get(incidentKey)
        if (held === undefined || held.instance !== this.instance || this.lease === null) return
        const announcedTo = change.announcedTo === undefined ? held.announcedTo : [...new Set([...(held.announcedTo ?? []), ...change.announcedTo])]
        const next = holdingOf({ ...held, ...change, ...(announcedTo !== undefined ? { announcedTo } : {}) })
        const from: string = found?.text ?? JSON.stringify(held)
        const res = await this.call(async () => await this.client.txn([{ key, target: 'VALUE', value: from }], [{ key, value: JSON.stringify(next), lease: await this.leaseId() }], key))
        if (res.succeeded) {
          this.hold(incidentKey, next, res.revision)
          return
        }
        // The compare is against the text etcd holds, as it is written (another writer's key order).
        const kv = res.kvs[0]
        const now: Holding | null = kv === undefined ? null : readHolding(kv.value)
        if (kv === undefined || now === null) return
        this.seen(incidentKey, now, kv.modRevision)
        found = { holding: now, text: kv.value }
      }
      this.deps.logger.warn({ event: 'fleet_incident', incident: incidentKey, change: Object.keys(change) }, 'fleet: the incident key keeps changing under its holder; this progress is not recorded on it')
    })
    this.progressing = write.catch(() => {})
    await write
  }

  /**
   * One etcd call within CALL_TIMEOUT_MS, tried again while the error is one etcd calls
   * recoverable: a member just lost, or an election after the leader went, lasts a second
   * or two, and the client's own three quick attempts can all land inside it.
   */
  private async call<T> (op: () => Promise<T>, again: (err: Error) => boolean = this.recoverable): Promise<T> {
    const deadline = Date.now() + CALL_TIMEOUT_MS
    for (let pause = 100; ; pause = Math.min(pause * 2, 800)) {
      const left = deadline - Date.now()
      try {
        return await withTimeout(op(), Math.max(left, 1))
      } catch (err) {
        const after = deadline - Date.now()
        if (!(err instanceof Error) || !again(err) || after <= pause) throw err
        await new Promise((resolve) => setTimeout(resolve, pause))
      }
    }
  }

  private async leaseId (): Promise<string> {
    if (this.lease === null || this.lease.revoked()) {
      const lease = this.client.lease(Math.ceil(this.config.leaseTtlMs / 1000), (err, expired) => {
        if (this.lease === lease) this.lease = null
        this.deps.logger.warn({ event: 'fleet', error: err.message }, 'fleet: lease lost; incident keys held by this sidecar are gone')
        // etcd says so: whoever holds those incidents now, it is not this sidecar.
        if (!expired || this.stopped) return
        for (const [incidentKey, held] of [...this.incidents]) if (held.instance === this.instance) this.lostHold(incidentKey, held)
      })
      this.lease = lease
    }
    return await this.lease.grant()
  }

  private incidentEvent (incidentKey: string, kv: KeyValue, deleted: boolean): void {
    if (!deleted) {
      const holding = readHolding(kv.value)
      if (holding !== null) this.seen(incidentKey, holding, kv.modRevision)
      return
    }
    this.released(incidentKey)
  }

  /**
   * Incident keys a read of the folders at `revision` no longer holds, though their last
   * known value is not newer than it: gone (a lease expired, a holder stopped) while the watch did
   * not say so — it was being restarted, or the probe's read got there first, after which the
   * watch's own delete event is taken as already applied. Without this, followers of a leader
   * gone that way would follow it for ever.
   */
  private goneBy (kvs: readonly KeyValue[], revision: number): void {
    const present = new Set(kvs.map((kv) => this.incidentOf(kv)))
    for (const incidentKey of [...this.incidents.keys()]) {
      if (!present.has(incidentKey) && (this.incidentRevisions.get(incidentKey) ?? 0) <= revision) this.released(incidentKey)
    }
  }

  /** The incident key is gone: its holder went away, unless the incident had ended. */
  private released (incidentKey: string): void {
    const last = this.incidents.get(incidentKey)
    this.incidents.delete(incidentKey)
    this.incidentRevisions.delete(incidentKey)
    if (last === undefined || last.restoredAt !== undefined) return
    // This sidecar's own key gone (its lease expired while it was frozen or cut off) is no news
    // of another leader: this sidecar no longer holds it.
    if (last.instance === this.instance) { this.lostHold(incidentKey, last); return }
    if (last.acted) this.deps.logger.warn({ event: 'fleet_incident', incident: incidentKey, previousLeader: last.instance }, 'fleet: the incident leader is gone after acting, before restoration was verified; a sidecar following it carries the incident on')
    else this.deps.logger.warn({ event: 'fleet_incident', incident: incidentKey, previousLeader: last.instance }, 'fleet: the incident leader is gone before acting; a still-firing sidecar takes over')
    this.onIncidentReleased(incidentKey, last)
  }

  /** This sidecar held `incidentKey` (as `last`) and no longer does; a clean stop hands it on, and is not a loss. */
  private lostHold (incidentKey: string, last: Holding): void {
    if (this.stopped || last.restoredAt !== undefined) return
    this.onIncidentLost(incidentKey, last)
  }

  /** This sidecar's own incident key, as it wrote it at `revision`. */
  private hold (incidentKey: string, holding: Holding, revision: number): void {
    this.incidents.set(incidentKey, holding)
    this.incidentRevisions.set(incidentKey, revision)
  }

  /**
   * An incident key as read at `revision` (watch or resync): another holder's news is passed on
   * once. A value older than the one kept is dropped: the watch's event for the holder's own write
   * can arrive after the answer to its next write, and taking it would put the older value back —
   * the holder's next `progress` would then compare against a value etcd no longer has. (When
   * etcd went back, `resync` has set the kept revisions to 0 first.)
   */
  private seen (incidentKey: string, holding: Holding, revision: number): void {
    if (revision < (this.incidentRevisions.get(incidentKey) ?? 0)) return
    const before = this.incidents.get(incidentKey)
    this.hold(incidentKey, holding, revision)
    if (holding.instance === this.instance) return
    // Another sidecar holds what this one held (a read after its lease lapsed): it steps down.
    if (before?.instance === this.instance) this.lostHold(incidentKey, before)
    const page = holding.statusPage
    // A new holder is news too: a resync read across a handover shows it without the key ever
    // absent here (no release), and the followers must follow it from now on.
    const news = (before !== undefined && before.instance !== holding.instance) ||
      (holding.escalatedAt !== undefined && holding.escalatedAt !== before?.escalatedAt) || (holding.restoredAt !== undefined && holding.restoredAt !== before?.restoredAt) ||
      (page !== undefined && (page.id !== before?.statusPage?.id || page.status !== before.statusPage.status || page.round !== before.statusPage.round))
    if (news) this.onIncidentProgress(incidentKey, holding)
  }

  // ---- sync loop ----

  private async run (): Promise<void> {
    let backoff = BACKOFF_MIN_MS
    while (!this.stopped) {
      try {
        await this.resync()
        this.setConnected(true, null)
        backoff = BACKOFF_MIN_MS
        const why = await this.watchUntilBroken()
        this.deps.logger.debug({ event: 'fleet', why }, 'fleet: watch ended; resyncing')
        // A broken watch is not a lost etcd: another member may answer the resync at once.
        await this.dropWatch()
        if (!this.stopped) await this.sleep(BACKOFF_MIN_MS)
      } catch (err) {
        await this.dropWatch()
        if (this.stopped) break
        this.setConnected(false, (err as Error).message)
        await this.sleep(backoff * (0.75 + Math.random() * 0.5))
        backoff = Math.min(BACKOFF_MAX_MS, backoff * 2)
      }
    }
  }

  private setConnected (connected: boolean, why: string | null): void {
    this.connected = connected
    if (connected) this.lost = null
    else this.lost = { since: this.lost?.since ?? new Date().toISOString(), error: why ?? 'unknown' }
    if (this.reported === connected) return
    this.reported = connected
    const fields = { event: 'fleet', connected, endpoints: this.config.etcd.endpoints, revision: this.deps.state().revision }
    if (connected) this.deps.logger.info(fields, 'fleet: connected to etcd; fleet state in sync')
    else this.deps.logger.warn({ ...fields, error: why }, 'fleet: etcd unreachable; keeping the last fleet state and retrying')
  }

  /**
   * Read the folders at one revision and make the applied state exactly that. No watch is
   * live here, so a read older than the revision last seen means etcd went back (rebuilt empty,
   * or restored from a backup): its revision is taken as it is, or the watch would start past
   * every write made after the rebuild and never deliver one.
   */
  private async resync (): Promise<number> {
    const res = await this.readFolders()
    const revision = res.revision
    const seen = this.deps.state().revision
    if (revision < seen) {
      this.deps.logger.warn({ event: 'fleet', revision, previousRevision: seen }, 'fleet: etcd is back at an older revision (rebuilt or restored from a backup); its data is the fleet state now')
      // Incident keys read before hold revisions of the old history: not newer than this read.
      for (const incidentKey of this.incidentRevisions.keys()) this.incidentRevisions.set(incidentKey, 0)
    }
    await this.applySnapshot(res.kvs, revision, revision < seen)
    return revision
  }

  /**
   * The folders Breakwater reads (the overrides and the incident keys) at one revision. Not the
   * whole prefix: anything else kept under it (notes, another tool's data, megabytes of it) would
   * make every probe read it all within one attempt, and a link that is fine would be taken for lost.
   */
  private async readFolders (): Promise<{ revision: number, kvs: KeyValue[] }> {
    return await this.call(async () => await this.client.ranges([...KINDS, 'incidents'].map((folder) => `${this.root}${folder}/`)))
  }

  /** Apply a read of the folders; `wentBack`: etcd's revision went back, and the read's revision replaces the one seen. */
  private async applySnapshot (kvs: KeyValue[], revision: number, wentBack = false): Promise<boolean> {
    const next: FleetState = { revision, flags: {}, circuits: {}, failovers: {} }
    const current = this.deps.state()
    for (const kv of kvs) {
      const incident = this.incidentOf(kv)
      const holding = incident === null ? null : readHolding(kv.value)
      if (incident !== null && holding !== null) this.seen(incident, holding, kv.modRevision)
      const parsed = this.parse(kv)
      if (parsed === null) continue
      if (parsed.entry === undefined) {
        // Corrupt: keep what was there.
        const kept = current[parsed.kind][parsed.name]
        if (kept !== undefined) next[parsed.kind][parsed.name] = kept
        continue
      }
      if (parsed.entry !== null) next[parsed.kind][parsed.name] = parsed.entry
    }
    this.goneBy(kvs, revision)
    let changed = false
    await this.serial(async () => {
      for (const kind of KINDS) {
        const names = new Set([...Object.keys(current[kind]), ...Object.keys(next[kind])])
        for (const name of names) {
          const entry = next[kind][name] ?? null
          if (JSON.stringify(entry) === JSON.stringify(current[kind][name] ?? null)) continue
          changed = true
          await this.deps.changed(kind, name, entry)
        }
      }
      // A newer revision alone is not worth a disk write: it goes out with the next commit.
      if (revision > current.revision || wentBack) current.revision = revision
    })
    return changed
  }

  /** Resolves with why the watch ended: its stream broke, etcd stopped answering, or it stalled. */
  private async watchUntilBroken (): Promise<string> {
    const from = this.deps.state().revision + 1
    // The stream may end before the promise below is there to hear it.
    let endedEarly: string | null = null
    let ended = (why: string): void => { endedEarly ??= why }
    // Each attempt on a member is bounded by the client (ATTEMPT_MS, and SIGN_IN_MS for a sign-in), so this cannot hang.
    this.watcher = await this.client.watch(this.root, from, {
      event: (kv, deleted) => { void this.event(kv, deleted) },
      end: (why) => { ended(why) }
    })
    // stop() may have come while the watch was being created, when there was nothing to wake.
    if (this.stopped) return 'stopping'
    if (endedEarly !== null) return endedEarly
    return await new Promise<string>((resolve, reject) => {
      let done = false
      const finish = (): boolean => {
        if (done) return false
        done = true
        clearInterval(probe)
        this.wake = null
        return true
      }
      const end = (why: string): void => { if (finish()) resolve(why) }
      const fail = (err: Error): void => { if (finish()) reject(err) }
      this.wake = () => { end('stopping') }
      ended = end
      let probing = false
      const probe = setInterval(() => {
        if (probing) return
        probing = true
        this.probe().then((stalled) => { if (stalled !== null) end(stalled) }, (err: unknown) => { fail(new Error(`etcd did not answer: ${(err as Error).message}`)) })
          .finally(() => { probing = false })
      }, this.probeMs)
      probe.unref()
    })
  }

  /**
   * Read the folders again; when it shows a change the watch has not delivered by now, apply it
   * and say the watch stalled (it is then restarted from the read's revision).
   */
  private async probe (): Promise<string | null> {
    const res = await this.readFolders()
    const revision = res.revision
    // Changes the watch should have delivered by the time of this read: those at or before it.
    await this.applying
    const seen = this.deps.state().revision
    // Older than what the watch delivered: a write landed after this read, or etcd went back
    // (rebuilt, restored), which only a read with no watch live can tell: resync and re-watch.
    if (revision < seen) return 'etcd answered at an older revision than the watch delivered'
    if (revision === seen) return null
    const missed = await this.applySnapshot(res.kvs, revision)
    if (!missed) return null
    this.deps.logger.warn({ event: 'fleet', revision }, 'fleet: the watch fell behind etcd; state re-read and the watch restarted')
    return 'watch stalled'
  }

  private async event (kv: KeyValue, deleted: boolean): Promise<void> {
    const revision = kv.modRevision
    const parsed = this.parse(kv, deleted)
    await this.serial(async () => {
      const state = this.deps.state()
      if (revision <= state.revision) return // already applied by a resync
      state.revision = revision
      const incident = this.incidentOf(kv)
      if (incident !== null) { this.incidentEvent(incident, kv, deleted); return }
      // Corrupt, or what this sidecar already applied (its own write, seen again): nothing to do.
      if (parsed === null || parsed.entry === undefined || JSON.stringify(parsed.entry) === JSON.stringify(state[parsed.kind][parsed.name] ?? null)) return
      await this.deps.changed(parsed.kind, parsed.name, parsed.entry)
    })
  }

  /** The incident key of an `incidents/…` key, else null. */
  private incidentOf (kv: KeyValue): string | null {
    const rest = kv.key.slice(this.root.length)
    return rest.startsWith('incidents/') && rest.length > 'incidents/'.length ? rest.slice('incidents/'.length) : null
  }

  /** One key: a fleet override (entry null: deleted; undefined: corrupt), or null for other keys. */
  private parse (kv: KeyValue, deleted = false): { kind: Kind, name: string, entry: FleetEntry | null | undefined } | null {
    const key = kv.key
    const rest = key.slice(this.root.length)
    const slash = rest.indexOf('/')
    const kind = rest.slice(0, slash)
    const name = rest.slice(slash + 1)
    if (!isKind(kind) || name === '') return null
    if (deleted) return { kind, name, entry: null }
    const entry = readEntry(kind, kv.value)
    if (entry === null) {
      const seen = `${key}@${kv.modRevision}`
      if (!this.corruptSeen.has(seen)) {
        this.corruptSeen.add(seen)
        this.corruptTotal++
        this.deps.logger.warn({ event: 'fleet_corrupt_value', key, revision: kv.modRevision }, 'fleet: ignored a value under the prefix that is not a Breakwater override; the last good one stays in force')
      }
      return { kind, name, entry: undefined }
    }
    return { kind, name, entry }
  }

  /** Applies one at a time, in order (watch events and resyncs never interleave). */
  private async serial (fn: () => Promise<void>): Promise<void> {
    const run = this.applying.then(fn)
    this.applying = run.catch((err: unknown) => { this.deps.logger.error({ event: 'fleet', err }, 'fleet: applying a change failed') })
    await this.applying
  }

  private async sleep (ms: number): Promise<void> {
    if (this.stopped) return
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => { this.wake = null; resolve() }, ms)
      timer.unref()
      this.wake = () => { clearTimeout(timer); resolve() }
    })
  }

  private async dropWatch (): Promise<void> {
    const w = this.watcher
    this.watcher = null
    w?.cancel()
  }

  async stop (): Promise<void> {
    this.stopped = true
    this.wake?.()
    await this.running
    await this.dropWatch()
    // A clean stop hands incidents over at once instead of after the lease's ttl.
    const lease = this.lease
    this.lease = null
    if (lease !== null) await withTimeout(lease.revoke(), 1000).catch(() => {})
    await this.client.close()
  }
}

function unavailable (why: string): ControlError {
  return new ControlError(503, 'fleet_unavailable', `the fleet store (etcd) is unreachable, so the fleet override was not written (${why}); local actions still work: retry without "scope": "fleet" (CLI: without --fleet) to act on this sidecar only`)
}

function isKind (kind: string): kind is Kind {
  return (KINDS as readonly string[]).includes(kind)
}

/** Whether `value` is one a fleet override of `kind` may hold (null: dropped, or lifted). */
function validValue (kind: Kind, value: unknown): boolean {
  if (value === null) return true
  switch (kind) {
    case 'flags': return typeof value === 'boolean'
    case 'circuits': return value === 'open' || value === 'closed'
    case 'failovers': return typeof value === 'string' && value !== ''
  }
}

/** A fleet override read from etcd, or null when it is not one. */
export function readEntry (kind: Kind, text: string): FleetEntry | null {
  let v: unknown
  try { v = JSON.parse(text) } catch { return null }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return null
  const e = v as Record<string, unknown>
  if (!validValue(kind, e.value) || typeof e.at !== 'string' || Number.isNaN(Date.parse(e.at))) return null
  const expiresAt = typeof e.expiresAt === 'string' && !Number.isNaN(Date.parse(e.expiresAt)) ? e.expiresAt : null
  if (e.expiresAt !== undefined && e.expiresAt !== null && expiresAt === null) return null
  return {
    value: e.value as FleetEntry['value'],
    reason: typeof e.reason === 'string' ? e.reason : '',
    requester: typeof e.requester === 'string' ? e.requester : 'unknown',
    at: e.at,
    ttlMs: typeof e.ttlMs === 'number' ? e.ttlMs : null,
    expiresAt,
    instance: typeof e.instance === 'string' ? e.instance : 'unknown',
    // Same key order as the writer's entry: a sidecar's own write, seen again, compares equal.
    ...(typeof e.id === 'string' && e.id !== '' ? { id: e.id } : {})
  }
}

function readHolding (text: string): Holding | null {
  try {
    const v = JSON.parse(text) as Partial<Holding> | null
    if (v === null || typeof v !== 'object' || typeof v.instance !== 'string') return null
    return holdingOf(v as Partial<Holding> & { instance: string })
  } catch {
    return null
  }
}

/**
 * A holding with its keys always in one order: `progress` compares the text in etcd with the
 * holding as last seen, so the holder's writes and every reader's copies must serialise alike.
 */
function holdingOf (v: Partial<Holding> & { instance: string }): Holding {
  return {
    instance: v.instance,
    trigger: String(v.trigger ?? ''),
    at: String(v.at ?? ''),
    acted: v.acted === true,
    ...(typeof v.incident === 'string' && v.incident !== '' ? { incident: v.incident } : {}),
    ...(typeof v.announcedAt === 'string' ? { announcedAt: v.announcedAt } : {}),
    ...(Array.isArray(v.announcedTo) && v.announcedTo.length > 0 ? { announcedTo: v.announcedTo.filter((r): r is string => typeof r === 'string') } : {}),
    ...(typeof v.escalatedAt === 'string' ? { escalatedAt: v.escalatedAt } : {}),
    ...(typeof v.restoredAt === 'string' ? { restoredAt: v.restoredAt } : {}),
    ...(typeof v.statusPage?.id === 'string' && v.statusPage.id !== '' ? { statusPage: { id: v.statusPage.id, status: String(v.statusPage.status ?? ''), ...(typeof v.statusPage.round === 'number' && v.statusPage.round > 0 ? { round: v.statusPage.round } : {}) } } : {})
  }
}

async function withTimeout<T> (p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => { timer = setTimeout(() => { reject(new Error(`no answer within ${ms} ms`)) }, ms) })])
  } finally {
    clearTimeout(timer)
  }
}
