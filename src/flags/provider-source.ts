/**
 * `flagProvider` (SPEC §16): any OpenFeature server provider as a flag source — flagd (RPC or
 * in-process), OFREP, a vendor's. The module is loaded with `await import()` only when the config
 * names it, its class constructed as `new Provider(options, logger)` and registered with the
 * OpenFeature SDK under a domain of this sidecar's own.
 *
 * Its flags are read into the snapshot on the provider's READY and CONFIGURATION_CHANGED events
 * (and every `pollMs` — always for a provider without events), never per request: every key the
 * sidecar uses is evaluated once through the OpenFeature client. A provider that is in error,
 * stale or not ready keeps the last flags it gave; its errors are logged and counted.
 *
 * Targeting. Provider evaluation is asynchronous and costs tens of microseconds, so the request
 * path never calls it. A flag the provider evaluates with targeting (its reason is not STATIC)
 * is evaluated per request by the flagd-core that holds the provider's own flag definitions —
 * flagd's in-process provider keeps them at `_service._flagdCore`, and its evaluation is that
 * object's synchronous call wrapped in a promise, so the result is the provider's. Other
 * providers, and flagd in RPC mode, give no synchronous evaluation: their targeted flags are
 * served with the value the provider gives a request without context, with a warning and a count.
 */
import { randomBytes } from 'node:crypto'
import {
  OpenFeature,
  ProviderEvents,
  ProviderStatus,
  ErrorCode,
  StandardResolutionReasons,
  NOOP_PROVIDER,
  type Client,
  type Provider,
  type Hook,
  type EvaluationContext,
  type Logger as FeatureLogger
} from '@openfeature/server-sdk'
import type { Logger } from 'pino'
import type { FlagProviderConfig } from '../config/types.js'
import type { ProviderFlag } from './sources.js'
import type { FlagdEvaluator } from './targeting.js'

/** What the provider source needs from the snapshot. */
export interface ProviderSourceHooks {
  /** Every flag key the sidecar uses: these are read from the provider. */
  keys: () => Iterable<string>
  codeDefault: (key: string) => boolean
  /** A read finished: the provider's flags now. */
  onFlags: (flags: ReadonlyMap<string, ProviderFlag>) => void
  /** A provider error, stale state or failed read (already logged): count it. */
  onError: () => void
}

type ProviderClass = new (options: Readonly<Record<string, unknown>>, logger: FeatureLogger) => Provider

/** How long start-up waits for the provider's first READY before serving on the other sources. */
const START_WAIT_MS = 5000
/** Without events, and without `pollMs`, the provider is read this often: SPEC §14, a flag source's change applies within 1 s. */
const DEFAULT_POLL_MS = 500
/**
 * A read still running after this long is given up on: the last flags stay, and the next read
 * does not queue behind it. A provider whose evaluation never settles (a lost RPC, a promise
 * that is never resolved) would otherwise hold every later read, and a kill switch set at the
 * provider once it recovers would never apply.
 */
const READ_DEADLINE_MS = 1000
const RETRY_MIN_MS = 1000
const RETRY_MAX_MS = 30_000

/**
 * The provider class named by the config. Throws with a message naming the config key; also
 * what `validate` runs.
 */
export async function loadProviderClass (config: FlagProviderConfig): Promise<ProviderClass> {
  let mod: Record<string, unknown>
  try {
    mod = await import(config.module) as Record<string, unknown>
  } catch (err) {
    throw new Error(`flagProvider.module: cannot load "${config.module}": ${(err as Error).message.split('\n')[0] ?? ''}`)
  }
  const exported = mod[config.export]
  if (typeof exported !== 'function') {
    const classes = Object.keys(mod).filter((k) => k !== 'default' && typeof mod[k] === 'function')
    const what = config.export === 'default' ? 'default export' : `export "${config.export}"`
    throw new Error(`flagProvider.export: "${config.module}" has no ${what} that is a provider class${classes.length > 0 ? `; name one of: ${classes.join(', ')}` : ''}`)
  }
  return exported as ProviderClass
}

/**
 * The synchronous flagd-core behind flagd's in-process provider, or null. Internal to
 * @openfeature/flagd-provider (0.16); a test runs the real provider, so a release that moves
 * it fails there, and the fallback is the warned context-free value, never an exception.
 */
function flagdCoreOf (provider: Provider): FlagdEvaluator | null {
  const core = (provider as { _service?: { _flagdCore?: unknown } })._service?._flagdCore
  return core !== null && typeof core === 'object' && typeof (core as FlagdEvaluator).resolveBooleanEvaluation === 'function' ? core as FlagdEvaluator : null
}

/**
 * flagd's in-process provider adds the sync stream's context to every evaluation (a hook over
 * `getSyncContext()`); so does this wrapper, taken at each read. A file source has none.
 */
function withSyncContext (core: FlagdEvaluator, provider: Provider): FlagdEvaluator {
  const sync = (provider as { getSyncContext?: () => EvaluationContext | null }).getSyncContext?.() ?? null
  if (sync === null || Object.keys(sync).length === 0) return core
  return {
    resolveBooleanEvaluation: (key, defaultValue, context, logger) => core.resolveBooleanEvaluation(key, defaultValue, { ...context, ...sync }, logger)
  }
}

/** How one evaluation failed: `foreign` when the provider threw an error that is not OpenFeature's. */
interface EvaluationFailure { foreign: boolean }

const ERROR_CODES = new Set<string>(Object.values(ErrorCode))

/**
 * An evaluation hook that tells a provider's own failure from an evaluation error. The SDK
 * reports both as `GENERAL`: an error resolution (flagd's broken rule) reaches the hook as an
 * OpenFeature error carrying its code; a plain exception (ECONNREFUSED, a TypeError) as itself.
 */
function noteForeignError (failure: EvaluationFailure): Hook {
  return {
    error: (_context, err) => {
      const code = (err as { code?: unknown } | null)?.code
      failure.foreign = typeof code !== 'string' || !ERROR_CODES.has(code)
    }
  }
}

export class ProviderSource {
  /** The provider's flags at the last read. */
  flags: ReadonlyMap<string, ProviderFlag> = new Map()
  private readonly domain = `breakwater-provider-${randomBytes(6).toString('hex')}`
  private provider: Provider | null = null
  private client: Client | null = null
  private providerClass: ProviderClass | null = null
  private reading: Promise<void> = Promise.resolve()
  /** The read queued behind the running one, not started yet; null when none is. */
  private waiting: Promise<void> | null = null
  /** Numbers each read; a read given up on (READ_DEADLINE_MS) that settles later is discarded. */
  private reads = 0
  /** A read was given up on and none has finished since: logged once per change of state. */
  private late = false
  private pollTimer: NodeJS.Timeout | null = null
  private retryTimer: NodeJS.Timeout | null = null
  private retryMs = RETRY_MIN_MS
  private closed = false
  private listening = false
  /** Flags warned about at the last read (not boolean, an evaluation error, targeting without a synchronous evaluator). */
  private warned = new Set<string>()
  /** In error or stale since the last READY: logged once per change of state, counted every time. */
  private failing = false
  private readonly onReady = (): void => {
    if (this.failing) this.logger.info({ event: 'flag_source', module: this.config.module }, 'flag provider ready again')
    this.failing = false
    void this.read()
  }

  private readonly onChanged = (): void => { void this.read() }
  private readonly onProviderError = (details?: { message?: string }): void => { this.failed('flag provider error; keeping its last flags', details?.message) }
  private readonly onStale = (details?: { message?: string }): void => { this.failed('flag provider stale; keeping its last flags', details?.message) }

  constructor (readonly config: FlagProviderConfig, private readonly logger: Logger, private readonly featureLogger: FeatureLogger, private readonly hooks: ProviderSourceHooks) {}

  /**
   * Load, construct and register the provider, then read its flags. Throws (a start-up error)
   * when the module or its class cannot be loaded or constructed; a provider that fails to
   * initialise is logged, counted and retried with backoff while the sidecar serves.
   */
  async start (): Promise<void> {
    this.providerClass = await loadProviderClass(this.config)
    const provider = this.construct()
    this.client = OpenFeature.getClient(this.domain)
    this.client.setLogger(this.featureLogger)
    await this.register(provider)
    const pollMs = this.config.pollMs ?? (provider.events === undefined ? DEFAULT_POLL_MS : null)
    if (pollMs !== null && pollMs > 0) {
      this.pollTimer = setInterval(this.onChanged, pollMs)
      this.pollTimer.unref()
    }
    await this.read()
  }

  private construct (): Provider {
    const ProviderCtor = this.providerClass as ProviderClass
    let provider: Provider
    try {
      provider = new ProviderCtor(this.config.options, this.featureLogger)
    } catch (err) {
      throw new Error(`flagProvider.options: the provider refused them: ${(err as Error).message}`)
    }
    if (typeof (provider as Partial<Provider>).resolveBooleanEvaluation !== 'function') {
      throw new Error(`flagProvider.export: "${this.config.export}" of "${this.config.module}" is not an OpenFeature server provider (no resolveBooleanEvaluation)`)
    }
    this.provider = provider
    return provider
  }

  /** Register and wait (bounded) for initialisation; a failed one is retried with a new instance. */
  private async register (provider: Provider): Promise<void> {
    const init = OpenFeature.setProviderAndWait(this.domain, provider)
    // Handlers go on once the domain has its provider: before that the client reports the
    // default provider's status, and a READY handler would run at once against it.
    const client = this.client as Client
    if (!this.listening) {
      this.listening = true
      client.addHandler(ProviderEvents.Ready, this.onReady)
      client.addHandler(ProviderEvents.ConfigurationChanged, this.onChanged)
      client.addHandler(ProviderEvents.Error, this.onProviderError)
      client.addHandler(ProviderEvents.Stale, this.onStale)
    }
    let deadline: NodeJS.Timeout | undefined
    const waited = new Promise<'waiting'>((resolve) => { deadline = setTimeout(() => resolve('waiting'), START_WAIT_MS) })
    try {
      const outcome = await Promise.race([init, waited])
      if (outcome === 'waiting') {
        this.logger.warn({ event: 'flag_source', module: this.config.module, waitedMs: START_WAIT_MS }, 'flag provider not ready yet; serving on the other flag sources until it is')
        init.catch(() => { this.retryLater() })
      }
      this.retryMs = RETRY_MIN_MS
    } catch {
      // Logged and counted by the ERROR event handler.
      this.retryLater()
    } finally {
      clearTimeout(deadline)
    }
  }

  private retryLater (): void {
    if (this.closed || this.retryTimer !== null) return
    const delay = this.retryMs
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS)
    if (delay === RETRY_MIN_MS) this.logger.warn({ event: 'flag_source', module: this.config.module, retryInMs: delay }, 'flag provider failed to initialise; retrying with backoff')
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null
      if (this.closed) return
      let provider: Provider
      try {
        provider = this.construct()
      } catch (err) {
        this.failed('flag provider could not be constructed', (err as Error).message)
        this.retryLater()
        return
      }
      void this.register(provider)
    }, delay)
    this.retryTimer.unref()
  }

  /** Read every key now (serialised, each within READ_DEADLINE_MS); resolves once done. */
  async read (): Promise<void> {
    // Callers while a read waits its turn share it: polls and events never pile up behind a
    // slow provider, so a read asked for now runs within one deadline.
    let waiting = this.waiting
    if (waiting === null) {
      const run = this.reading.then(async () => {
        this.waiting = null
        await this.readWithin(READ_DEADLINE_MS)
      })
      waiting = this.waiting = this.reading = run.catch((err: unknown) => { this.problem('flag provider read failed; keeping its last flags', (err as Error).message) })
    }
    await waiting
  }

  /** One read, given up on after `deadlineMs`: the last flags stay, said once and counted. */
  private async readWithin (deadlineMs: number): Promise<void> {
    const read = ++this.reads
    let timer: NodeJS.Timeout | undefined
    const deadline = new Promise<'late'>((resolve) => { timer = setTimeout(resolve, deadlineMs, 'late') })
    try {
      const outcome = await Promise.race([this.readNow(read), deadline])
      if (outcome === 'late') {
        this.hooks.onError()
        if (!this.late) this.logger.warn({ event: 'flag_source', module: this.config.module, waitedMs: deadlineMs }, 'flag provider did not answer in time; keeping its last flags')
        this.late = true
      } else if (this.late) {
        this.late = false
        this.logger.info({ event: 'flag_source', module: this.config.module }, 'flag provider answers again')
      }
    } finally {
      clearTimeout(timer)
    }
  }

  private async readNow (read: number): Promise<void> {
    const client = this.client
    const provider = this.provider
    if (client === null || provider === null || this.closed) return
    const status = client.providerStatus
    // Not ready, in error or fatal: evaluations would only return defaults. Keep what we had.
    if (status !== ProviderStatus.READY && status !== ProviderStatus.STALE) return
    const core = flagdCoreOf(provider)
    const evaluator = core === null ? null : withSyncContext(core, provider)
    const next = new Map<string, ProviderFlag>()
    const warnedNow = new Set<string>()
    for (const key of this.hooks.keys()) {
      const failure: EvaluationFailure = { foreign: false }
      const d = await client.getBooleanDetails(key, this.hooks.codeDefault(key), {}, { hooks: [noteForeignError(failure)] })
      const errorCode = d.errorCode
      // A provider that lost its flag service (STALE) answers for it with errors that say nothing
      // about the flag: flagd's RPC provider gives FLAG_NOT_FOUND for a call that could not reach
      // flagd, GENERAL for one that timed out. Taken as answers, they would hand a kill switch the
      // provider holds to the next source or the code default, and lift it mid-outage.
      if ((errorCode === ErrorCode.FLAG_NOT_FOUND || errorCode === ErrorCode.GENERAL) && client.providerStatus === ProviderStatus.STALE) {
        this.warnOnce(warnedNow, key, `the provider lost its flag service (${errorCode}: ${d.errorMessage ?? ''}); this flag keeps its last value`)
        const last = this.flags.get(key)
        if (last !== undefined) next.set(key, last)
        continue
      }
      if (errorCode === ErrorCode.FLAG_NOT_FOUND) continue // not the provider's: the next source decides
      // The SDK passes on whatever value the provider returns: a string "false" is no boolean either.
      if (errorCode === ErrorCode.TYPE_MISMATCH || (errorCode === undefined && typeof d.value !== 'boolean')) {
        this.warnOnce(warnedNow, key, 'flag is not a boolean in the provider; ignored')
        continue
      }
      if (errorCode === ErrorCode.PROVIDER_NOT_READY || errorCode === ErrorCode.PROVIDER_FATAL || failure.foreign) {
        // A provider that threw (its backend unreachable, a bug) said nothing about the flag:
        // keep its last value, as for a provider in error; never the code default, which would
        // lift a kill switch the provider holds.
        if (failure.foreign) this.warnOnce(warnedNow, key, `the provider failed evaluating this flag (${d.errorMessage ?? ''}); its last value is kept`)
        const last = this.flags.get(key)
        if (last !== undefined) next.set(key, last)
        continue
      }
      if (errorCode !== undefined) {
        // flagd's rule for an evaluation error (a broken rule): the code default.
        this.warnOnce(warnedNow, key, `the provider could not evaluate this flag (${errorCode}: ${d.errorMessage ?? ''}); the code default applies`)
        next.set(key, { value: null, targeting: null })
        continue
      }
      if (d.reason === StandardResolutionReasons.DISABLED) {
        next.set(key, { value: null, targeting: null })
        continue
      }
      if (d.reason === StandardResolutionReasons.STATIC || d.reason === StandardResolutionReasons.CACHED) {
        next.set(key, { value: d.value, targeting: null })
        continue
      }
      if (evaluator !== null) {
        next.set(key, { value: d.value, targeting: evaluator })
        continue
      }
      if (d.reason === StandardResolutionReasons.TARGETING_MATCH || d.reason === StandardResolutionReasons.SPLIT) {
        this.warnOnce(warnedNow, key, 'the provider evaluates this flag with targeting but offers no synchronous evaluation; its value for a request without context is served')
      }
      next.set(key, { value: d.value, targeting: null })
    }
    if (this.closed || read !== this.reads) return // closed, or given up on and overtaken
    this.warned = warnedNow
    this.flags = next
    this.hooks.onFlags(next)
  }

  /** Log and count a flag's problem once while it lasts, not at every read. */
  private warnOnce (warnedNow: Set<string>, key: string, message: string): void {
    warnedNow.add(key)
    if (!this.warned.has(key)) this.problem(message, undefined, key)
  }

  private failed (message: string, detail: string | undefined): void {
    this.hooks.onError()
    if (this.failing) return
    this.failing = true
    this.logger.warn({ event: 'flag_source', module: this.config.module, error: detail }, message)
  }

  private problem (message: string, detail: string | undefined, flag?: string): void {
    this.hooks.onError()
    this.logger.warn({ event: 'flag_source', module: this.config.module, flag, error: detail }, message)
  }

  async close (): Promise<void> {
    this.closed = true
    if (this.pollTimer !== null) clearInterval(this.pollTimer)
    if (this.retryTimer !== null) clearTimeout(this.retryTimer)
    this.pollTimer = this.retryTimer = null
    const client = this.client
    if (client !== null) {
      client.removeHandler(ProviderEvents.Ready, this.onReady)
      client.removeHandler(ProviderEvents.ConfigurationChanged, this.onChanged)
      client.removeHandler(ProviderEvents.Error, this.onProviderError)
      client.removeHandler(ProviderEvents.Stale, this.onStale)
    }
    // Replacing it closes the provider (its watchers and streams); other domains keep theirs.
    if (this.provider !== null) await OpenFeature.setProviderAndWait(this.domain, NOOP_PROVIDER).catch(() => {})
  }
}
