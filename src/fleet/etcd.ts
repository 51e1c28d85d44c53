/**
 * An etcd v3 client over etcd's own HTTP/JSON gateway (`POST /v3/…`, etcd 3.4+), on the undici
 * the sidecar has loaded anyway: the few calls the fleet layer makes, and nothing more — put,
 * range, a transaction, a lease kept alive, a watch on a prefix. The gRPC client (etcd3) brought
 * @grpc/grpc-js, protobuf.js and http2 into every sidecar with a fleet: about 24 MiB of resident
 * memory (bench/README) for a handful of calls a minute.
 *
 * Members: a call goes to the member that answered last and, when that one cannot answer (refused,
 * reset, no answer within `attemptMs`, or etcd says it is unavailable: no leader, leader changed),
 * to the next, each once. Whether the caller retries the whole call is its business
 * (`recoverable` says whether it may help).
 *
 * The gateway speaks proto3 JSON: keys and values in base64, 64-bit numbers (revisions, lease ids)
 * as decimal strings, fields at their zero value left out (`succeeded: false`, an empty `kvs`).
 */
import type { Dispatcher } from 'undici'
import { Agent } from '../undici.js'

/** One key as etcd holds it. */
export interface KeyValue {
  key: string
  value: string
  modRevision: number
  /** The lease it is attached to, as etcd's decimal id; '' for none. */
  lease: string
}

export interface EtcdOptions {
  endpoints: readonly string[]
  username: string | null
  password: string | null
  /** PEM content (as the config check read it); without a CA an https:// endpoint is verified against the system's roots. */
  tls: { ca: string | null, cert: string | null, key: string | null } | null
  /** One attempt on one member. */
  attemptMs: number
  /**
   * One sign-in (username and password), default `attemptMs`. etcd checks the password with
   * bcrypt, slow by design and more so on a busy or throttled CPU: a sign-in has its own time,
   * never charged to the attempt of the call that needed it.
   */
  signInMs?: number
}

/** A condition of a transaction on one key. */
export type Compare = { key: string } & ({ target: 'CREATE', createRevision: number } | { target: 'MOD', modRevision: number } | { target: 'VALUE', value: string })

export interface TxnResult {
  succeeded: boolean
  revision: number
  /** What the failure branch's range read (when the transaction did not succeed). */
  kvs: KeyValue[]
}

/** What etcd (or the way to it) said no with. */
export class EtcdError extends Error {
  /**
   * `answered`: a member said so (electing, too busy); `silent`: a member took the connection
   * and said nothing within the attempt's time (frozen, or holding the call through an
   * election). Neither: a member that could not be reached at all.
   */
  constructor (message: string, readonly recoverable: boolean, readonly code: number | null = null, readonly answered = false, readonly silent = false) {
    super(message)
    this.name = 'EtcdError'
  }
}

/** Whether trying again (on this member or another) may succeed. */
export function recoverable (err: Error): boolean {
  return err instanceof EtcdError && err.recoverable
}

// gRPC status codes etcd answers with, in the gateway's `code`.
const DEADLINE_EXCEEDED = 4
const UNAUTHENTICATED = 16
const UNAVAILABLE = 14
/** etcd's own words for a cluster that is electing or too busy (rpctypes), whatever the code. */
const TRANSIENT = /no leader|leader changed|request timed out|timed out|too many requests|not capable|stopped/

interface Watch {
  /** Stop the watch (closes its stream). */
  cancel: () => void
}

export interface WatchHandlers {
  event: (kv: KeyValue, deleted: boolean) => void
  /** The stream ended, broke, or etcd cancelled it (for example: the start revision was compacted); called once. */
  end: (why: string) => void
}

interface RawKeyValue { key?: string, value?: string, mod_revision?: string, lease?: string }
interface Header { revision?: string }
interface TxnResponse { header?: Header, succeeded?: boolean, responses?: Array<{ response_range?: { kvs?: RawKeyValue[] } }> }

export class Etcd {
  private readonly agent: Agent
  private readonly origins: string[]
  /** The member that answered last: the first one asked next time. */
  private current = 0
  private token: string | null = null
  private authenticating: Promise<string> | null = null

  constructor (private readonly options: EtcdOptions) {
    const tls = options.tls
    this.origins = options.endpoints.map((e) => new URL(e).origin)
    this.agent = new Agent({
      keepAliveTimeout: 30_000,
      connect: {
        timeout: options.attemptMs,
        ...(tls?.ca != null ? { ca: tls.ca } : {}),
        ...(tls?.cert != null && tls.key !== null ? { cert: tls.cert, key: tls.key } : {})
      }
    })
  }

  /** Write `key`; the revision etcd wrote it at. */
  async put (key: string, value: string, lease?: string): Promise<number> {
    const res = await this.call('/v3/kv/put', putOf(key, value, lease)) as { header?: Header }
    return revisionOf(res.header)
  }

  /** One key, or every key under `key` as a prefix; with the revision read at. */
  async range (key: string, prefix = false): Promise<{ revision: number, kvs: KeyValue[] }> {
    const res = await this.call('/v3/kv/range', rangeOf(key, prefix)) as { header?: Header, kvs?: RawKeyValue[] }
    return { revision: revisionOf(res.header), kvs: (res.kvs ?? []).map(keyValueOf) }
  }

  /**
   * Every key under each of `prefixes`, read at one revision (one transaction with no compare):
   * what it costs depends on what those prefixes hold, never on the keys beside them.
   */
  async ranges (prefixes: readonly string[]): Promise<{ revision: number, kvs: KeyValue[] }> {
    const res = await this.call('/v3/kv/txn', { success: prefixes.map((p) => ({ request_range: rangeOf(p, true) })) }) as TxnResponse
    return { revision: revisionOf(res.header), kvs: (res.responses ?? []).flatMap((r) => (r.response_range?.kvs ?? []).map(keyValueOf)) }
  }

  /** If every compare holds, the puts; else read `otherwise` (a key), in one transaction. */
  async txn (compare: readonly Compare[], puts: ReadonlyArray<{ key: string, value: string, lease?: string }>, otherwise?: string): Promise<TxnResult> {
    const res = await this.call('/v3/kv/txn', {
      compare: compare.map(compareOf),
      success: puts.map((p) => ({ request_put: putOf(p.key, p.value, p.lease) })),
      ...(otherwise !== undefined ? { failure: [{ request_range: rangeOf(otherwise, false) }] } : {})
    }) as TxnResponse
    return {
      succeeded: res.succeeded === true,
      revision: revisionOf(res.header),
      kvs: (res.responses?.[0]?.response_range?.kvs ?? []).map(keyValueOf)
    }
  }

  /** A lease of `ttlSeconds`, granted on the first `grant()` and kept alive until revoked or lost. */
  lease (ttlSeconds: number, lost: (err: Error, expired: boolean) => void): Lease {
    return new Lease(this, ttlSeconds, lost)
  }

  /**
   * Watch every key under `prefix` from `startRevision`; resolves once etcd has created the
   * watch. Events come in revision order, as the stream delivers them.
   */
  async watch (prefix: string, startRevision: number, handlers: WatchHandlers): Promise<Watch> {
    const body = JSON.stringify({ create_request: { ...rangeOf(prefix, true), start_revision: String(startRevision) } })
    return await this.onMembers(async (at) => await this.openWatch(at, body, handlers))
  }

  private async openWatch (at: number, body: string, handlers: WatchHandlers): Promise<Watch> {
    const abort = new AbortController()
    // A member that took the connection and said nothing: silent, as for any other call.
    // Signed in first: the attempt's time is etcd's answer to the watch, not the sign-in's bcrypt.
    const headers = await this.headers(at)
    const timer = setTimeout(() => { abort.abort(new EtcdError(`no answer within ${this.options.attemptMs} ms`, true, null, false, true)) }, this.options.attemptMs)
    let created = false
    let ended = false
    const end = (why: string): void => {
      if (ended) return
      ended = true
      abort.abort(new EtcdError('watch cancelled', false))
      handlers.end(why)
    }
    try {
      const res = await this.agent.request({ origin: this.origins[at] as string, path: '/v3/watch', method: 'POST', headers, body, signal: abort.signal, bodyTimeout: 0 })
      if (res.statusCode !== 200) throw await errorOf(res)
      let buffered = ''
      await new Promise<void>((resolve, reject) => {
        res.body.setEncoding('utf8')
        res.body.on('data', (chunk: string) => {
          buffered += chunk
          for (let nl = buffered.indexOf('\n'); nl !== -1; nl = buffered.indexOf('\n')) {
            const line = buffered.slice(0, nl)
            buffered = buffered.slice(nl + 1)
            if (line.trim() === '') continue
            const why = this.watchMessage(line, handlers)
            if (why === 'created') { created = true; resolve() } else if (why !== null) {
              if (created) end(why)
              else reject(new EtcdError(why, false))
              return
            }
          }
        })
        res.body.on('error', (err: Error) => { if (created) end(`watch disconnected: ${err.message}`); else reject(err) })
        res.body.on('end', () => { if (created) end('watch disconnected: the stream ended'); else reject(new EtcdError('the watch stream ended before the watch was created', true)) })
      })
    } catch (err) {
      abort.abort()
      throw asEtcdError(err)
    } finally {
      clearTimeout(timer)
    }
    return { cancel: () => { ended = true; abort.abort(new EtcdError('watch cancelled', false)) } }
  }

  /** One message of the watch stream: 'created', why the watch ended, or null (events applied). */
  private watchMessage (line: string, handlers: WatchHandlers): string | null {
    let msg: { result?: { created?: boolean, canceled?: boolean, cancel_reason?: string, compact_revision?: string, events?: Array<{ type?: string, kv?: RawKeyValue }> }, error?: { message?: string } }
    try { msg = JSON.parse(line) } catch { return 'watch failed: an unreadable message' }
    if (msg.error !== undefined) return `watch failed: ${msg.error.message ?? 'unknown error'}`
    const result = msg.result ?? {}
    if (result.canceled === true) {
      return result.compact_revision !== undefined
        ? `watch failed: revision compacted (compacted up to ${result.compact_revision})`
        : `watch failed: cancelled by etcd (${result.cancel_reason ?? 'no reason given'})`
    }
    for (const e of result.events ?? []) if (e.kv !== undefined) handlers.event(keyValueOf(e.kv), e.type === 'DELETE')
    return result.created === true ? 'created' : null
  }

  /** One call, on the member that answered last, then on each other one once. */
  async call (path: string, body: unknown): Promise<unknown> {
    const text = JSON.stringify(body)
    return await this.onMembers(async (at) => await this.post(at, path, text))
  }

  /**
   * `attempt` on the member that answered last, then on each other one once, while the failure
   * is recoverable. When all fail, the error that says most about the cluster is thrown: a
   * member's own answer (electing, too busy), else one that held the call, else the last one
   * (a member that is gone says nothing about the others).
   */
  private async onMembers<T> (attempt: (at: number) => Promise<T>): Promise<T> {
    let best: EtcdError | null = null
    let last: Error = new EtcdError('no etcd endpoint', false)
    for (let i = 0; i < this.origins.length; i++) {
      const at = (this.current + i) % this.origins.length
      try {
        const res = await attempt(at)
        this.current = at
        return res
      } catch (err) {
        last = err as Error
        if (!recoverable(last)) throw last
        if (last instanceof EtcdError && (last.answered ? best?.answered !== true : last.silent && best === null)) best = last
      }
    }
    throw best ?? last
  }

  private async post (at: number, path: string, body: string, again = true): Promise<unknown> {
    try {
      // Signed in first (its own time, `signInMs`); the attempt's clock starts after.
      const headers = await this.headers(at)
      const res = await this.agent.request({ origin: this.origins[at] as string, path, method: 'POST', headers, body, signal: AbortSignal.timeout(this.options.attemptMs) })
      if (res.statusCode !== 200) throw await errorOf(res)
      const parsed = await res.body.json() as { error?: { grpc_code?: number, message?: string } }
      // A streaming call (lease keepalive) reports its error inside a 200.
      if (parsed.error !== undefined) throw classify(parsed.error.message ?? 'unknown error', parsed.error.grpc_code ?? null)
      return parsed
    } catch (err) {
      const e = asEtcdError(err, this.options.attemptMs)
      // A token etcd no longer knows (it restarted, or the token expired): sign in again, once.
      if (again && e.code === UNAUTHENTICATED && this.options.username !== null) {
        this.token = null
        return await this.post(at, path, body, false)
      }
      throw e
    }
  }

  private async headers (at: number): Promise<Record<string, string>> {
    // etcd's "require leader" (clientv3.WithRequireLeader, gRPC metadata `hasleader`, which the
    // gateway takes from this header): a member cut off from its cluster answers "no leader" at
    // once, and ends a watch when it loses its leader, instead of holding a call until the
    // attempt's time runs out or keeping a watch that delivers nothing.
    const headers: Record<string, string> = { 'content-type': 'application/json', 'grpc-metadata-hasleader': 'true' }
    if (this.options.username !== null) headers.authorization = await this.authenticate(at)
    return headers
  }

  /**
   * A token for the configured user (etcd's simple or JWT token), shared by the calls in flight.
   * Bounded by `signInMs`, not `attemptMs`: etcd spends the time on bcrypt, not on being away.
   */
  private async authenticate (at: number): Promise<string> {
    if (this.token !== null) return this.token
    const signInMs = this.options.signInMs ?? this.options.attemptMs
    this.authenticating ??= (async () => {
      try {
        const res = await this.agent.request({
          origin: this.origins[at] as string,
          path: '/v3/auth/authenticate',
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ name: this.options.username, password: this.options.password ?? '' }),
          signal: AbortSignal.timeout(signInMs)
        })
        if (res.statusCode !== 200) throw await errorOf(res)
        const { token } = await res.body.json() as { token?: string }
        if (typeof token !== 'string' || token === '') throw new EtcdError('etcd gave no token: is authentication enabled?', false)
        this.token = token
        return token
      } catch (err) {
        throw asEtcdError(err, signInMs)
      } finally {
        this.authenticating = null
      }
    })()
    return await this.authenticating
  }

  /** Close every connection, the watch's included. */
  async close (): Promise<void> {
    await this.agent.destroy().catch(() => {})
  }
}

/**
 * A lease: granted once, kept alive every third of its ttl, lost when etcd says it expired or could
 * not be reached for a whole ttl (`lost`'s `expired` says which). Its times are `performance.now()`'s:
 * a wall clock stepped back would make a lease look freshly kept long after it lapsed.
 */
export class Lease {
  private granted: Promise<string> | null = null
  private id = ''
  private gone = false
  private keptAt = 0
  /**
   * When the request that last granted or kept the lease alive was sent: etcd took it later, so
   * the lease lives in etcd at least until this plus its ttl, whatever happened to this process since.
   */
  private keptFrom = 0
  private timer: NodeJS.Timeout | null = null

  constructor (private readonly etcd: Etcd, private readonly ttlSeconds: number, private readonly lost: (err: Error, expired: boolean) => void) {}

  /** The lease's id, granted on the first call. */
  async grant (): Promise<string> {
    this.granted ??= (async () => {
      try {
        const from = performance.now()
        const res = await this.etcd.call('/v3/lease/grant', { TTL: String(this.ttlSeconds) }) as { ID?: string }
        if (typeof res.ID !== 'string') throw new EtcdError('etcd granted no lease', false)
        this.id = res.ID
        this.keptAt = performance.now()
        this.keptFrom = from
        this.schedule()
        return res.ID
      } catch (err) {
        this.gone = true
        throw err
      }
    })()
    return await this.granted
  }

  /** Whether it was revoked or lost (a new one is needed). */
  revoked (): boolean {
    return this.gone
  }

  /**
   * Whether this process's own clock proves the lease is alive in etcd now: it was kept alive
   * within two thirds of its ttl (Kubernetes' leader election: a renew deadline short of the
   * lease's duration). A process frozen or starved longer cannot tell without asking (`confirm`).
   */
  fresh (): boolean {
    return !this.gone && this.keptFrom > 0 && performance.now() - this.keptFrom < this.ttlSeconds * 1000 * 2 / 3
  }

  /**
   * Keep the lease alive now, and say whether etcd still has it: false when it expired (it is lost
   * then, `lost` told), or when it was revoked or lost before. Throws when etcd does not answer.
   */
  async confirm (): Promise<boolean> {
    if (this.gone || this.id === '') return false
    return await this.keepAlive(false)
  }

  async revoke (): Promise<void> {
    this.stop()
    if (this.id !== '') await this.etcd.call('/v3/lease/revoke', { ID: this.id })
  }

  private schedule (): void {
    if (this.gone) return
    this.timer = setTimeout(() => { void this.keepAlive() }, Math.max(100, this.ttlSeconds * 1000 / 3))
    this.timer.unref()
  }

  /** One keepalive: whether etcd still has the lease. `scheduled`: the timer's, which never throws and schedules the next. */
  private async keepAlive (scheduled = true): Promise<boolean> {
    const from = performance.now()
    try {
      const res = await this.etcd.call('/v3/lease/keepalive', { ID: this.id }) as { result?: { TTL?: string } }
      if (this.gone) return false
      // etcd answers a lease it no longer has without a TTL.
      if (!(Number(res.result?.TTL ?? 0) > 0)) { this.lose(new Error('the lease expired'), true); return false }
      this.keptAt = performance.now()
      this.keptFrom = Math.max(this.keptFrom, from)
    } catch (err) {
      if (this.gone) return false
      if (!scheduled) throw err
      if (performance.now() - this.keptAt >= this.ttlSeconds * 1000) { this.lose(new Error(`the lease could not be kept alive for its ttl (${(err as Error).message})`), false); return false }
    }
    if (scheduled) this.schedule()
    return true
  }

  private lose (err: Error, expired: boolean): void {
    this.stop()
    this.lost(err, expired)
  }

  private stop (): void {
    this.gone = true
    if (this.timer !== null) clearTimeout(this.timer)
    this.timer = null
  }
}

function classify (message: string, code: number | null): EtcdError {
  return new EtcdError(message, code === UNAVAILABLE || code === DEADLINE_EXCEEDED || TRANSIENT.test(message), code, true)
}

/**
 * The gateway's error answer: `{error, code, message}` with the gRPC code; a streaming call's
 * (the watch) is `{error: {grpc_code, message, …}}`.
 */
async function errorOf (res: Dispatcher.ResponseData): Promise<EtcdError> {
  const text = await res.body.text().catch(() => '')
  let parsed: { message?: string, error?: string | { message?: string, grpc_code?: number }, code?: number } = {}
  try { parsed = JSON.parse(text) } catch {}
  const inner = typeof parsed.error === 'object' && parsed.error !== null ? parsed.error : null
  const code = parsed.code ?? inner?.grpc_code
  // Not every refusal is JSON: etcd's gateway answers some in plain text.
  const message = parsed.message ?? inner?.message ?? (typeof parsed.error === 'string' ? parsed.error : undefined) ??
    (text.trim() !== '' ? `HTTP ${res.statusCode}: ${text.trim().slice(0, 200)}` : `HTTP ${res.statusCode}`)
  const err = classify(message, code ?? null)
  // 503 and the like are a member that cannot answer now, whatever it says.
  return res.statusCode >= 500 && !err.recoverable && code === undefined ? new EtcdError(message, true, null, true) : err
}

/** A failure on the way to etcd (refused, reset, timed out, TLS) is worth another member; one etcd gave stays as it is. */
/** `attemptMs`: the attempt's time limit, named when it ran out. */
function asEtcdError (err: unknown, attemptMs?: number): EtcdError {
  if (err instanceof EtcdError) return err
  const e = err as Error & { code?: string, cause?: Error }
  const tls = typeof e.code === 'string' && /CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO/.test(e.code)
  const message = e.name === 'TimeoutError' && attemptMs !== undefined
    ? `no answer within ${attemptMs} ms`
    : e.name === 'TimeoutError' || e.name === 'AbortError' ? (e.message !== '' ? e.message : 'no answer in time') : (e.message ?? String(err))
  return new EtcdError(message, !tls, null, false, e.name === 'TimeoutError')
}

function b64 (s: string): string {
  return Buffer.from(s).toString('base64')
}

function putOf (key: string, value: string, lease?: string): Record<string, string> {
  return { key: b64(key), value: b64(value), ...(lease !== undefined && lease !== '' ? { lease } : {}) }
}

/** A key, or with `prefix` the range of every key starting with it (its last byte plus one). */
function rangeOf (key: string, prefix: boolean): Record<string, string> {
  if (!prefix) return { key: b64(key) }
  const end = Buffer.from(key)
  let i = end.length - 1
  while (i >= 0 && end[i] === 0xff) i--
  // A prefix of only 0xff bytes (or none) has no end: every key from it on ("\0").
  if (i < 0) return { key: b64(key), range_end: 'AA==' }
  end[i] = (end[i] as number) + 1
  return { key: b64(key), range_end: end.subarray(0, i + 1).toString('base64') }
}

function compareOf (c: Compare): Record<string, string> {
  switch (c.target) {
    case 'CREATE': return { target: 'CREATE', result: 'EQUAL', key: b64(c.key), create_revision: String(c.createRevision) }
    case 'MOD': return { target: 'MOD', result: 'EQUAL', key: b64(c.key), mod_revision: String(c.modRevision) }
    case 'VALUE': return { target: 'VALUE', result: 'EQUAL', key: b64(c.key), value: b64(c.value) }
  }
}

function keyValueOf (kv: RawKeyValue): KeyValue {
  return {
    key: Buffer.from(kv.key ?? '', 'base64').toString(),
    value: Buffer.from(kv.value ?? '', 'base64').toString(),
    modRevision: Number(kv.mod_revision ?? 0),
    lease: kv.lease ?? ''
  }
}

function revisionOf (header: Header | undefined): number {
  return Number(header?.revision ?? 0)
}
