/**
 * The flag snapshot the request path reads. OpenFeature evaluation is asynchronous and costs
 * tens of microseconds a call; a kill switch must cost nanoseconds. So: on every
 * `ConfigurationChanged` from the provider, every known flag is evaluated once through the
 * OpenFeature client and a new `Map` swapped in; a request does one `Map.get`.
 *
 * A flag with flagd targeting cannot be one boolean: it also goes into `targeted`, whose entry
 * evaluates it per request with flagd-core (targeting.ts). `values` holds its value for a
 * request without context, for metrics, state and triage.
 */
import { randomBytes } from 'node:crypto'
import { OpenFeature, ProviderEvents, NOOP_PROVIDER, type Client, type Logger as FeatureLogger } from '@openfeature/server-sdk'
import type { Logger } from 'pino'
import type { Config } from '../config/types.js'
import { FlagSources } from './sources.js'
import { BreakwaterProvider } from './provider.js'
import { FlagFileWatcher, type FileFlags } from './flagd-file.js'
import { flagKeysRead, notBooleanProblem } from '../config/flag-file.js'
import { TargetedFlag, compileTargeting, featureLogger, uncompilable } from './targeting.js'
import { ProviderSource } from './provider-source.js'

export class FlagSnapshot {
  /** key → enabled. Read per request; replaced whole, never mutated. */
  values: ReadonlyMap<string, boolean> = new Map()
  /** Flags with targeting → their per-request evaluation; null when none. Replaced with `values`. */
  targeted: ReadonlyMap<string, TargetedFlag> | null = null
  readonly sources: FlagSources
  /** Recent changes of what the request path sees (for triage), oldest first, bounded. */
  readonly changes: Array<{ flag: string, enabled: boolean, at: number }> = []
  /** Flag file problems (unreadable, unparsable): counted, last good flags kept. */
  fileErrors = 0
  /** Flag provider problems (errors, stale state, failed reads): counted, last good flags kept. */
  providerErrors = 0
  private readonly provider: BreakwaterProvider
  private readonly domain = `breakwater-${randomBytes(6).toString('hex')}`
  private readonly featureLogger: FeatureLogger
  private config: Config
  private client: Client | null = null
  private watcher: FlagFileWatcher | null = null
  private flagService: ProviderSource | null = null
  /**
   * A provider a reload asked for, warming up: it replaces `flagService` once it has read its
   * flags, and until then the running one keeps serving (Envoy warms a changed cluster the same
   * way), so a kill switch held at the provider is not lost to a flag service slow to answer.
   */
  private nextService: ProviderSource | null = null
  /** The flag file's first read (it may wait for a file being written, see `FlagFileWatcher.start`). */
  private fileRead: Promise<void> = Promise.resolve()
  /** File reads being adopted, in order (one with targeting first loads flagd-core). */
  private adopting: Promise<void> = Promise.resolve()
  private refreshing: Promise<void> = Promise.resolve()
  private version = 0

  constructor (config: Config, private readonly logger: Logger) {
    this.config = config
    this.sources = new FlagSources(config.featureFlags)
    this.provider = new BreakwaterProvider(this.sources)
    this.featureLogger = featureLogger(logger)
  }

  /** Register the provider, read the flag file and the flag provider, build the first snapshot. */
  async start (config: Config): Promise<void> {
    this.config = config
    await OpenFeature.setProviderAndWait(this.domain, this.provider)
    this.client = OpenFeature.getClient(this.domain)
    this.client.addHandler(ProviderEvents.ConfigurationChanged, () => { void this.refresh() })
    this.watch(config)
    await this.fileRead
    await this.adopting
    await this.connect(config, true)
    await this.refresh()
  }

  /** Whether `key` is off by a kill: an override (an operator's or a trigger's, local or fleet) in force. */
  killed (key: string): boolean {
    return this.sources.overrides.get(key) === false
  }

  /** Whether a route guarded by `key` may be served (for a targeted flag: a request without context). Unknown keys are on. */
  enabled (key: string): boolean {
    return this.values.get(key) !== false
  }

  /**
   * Set (`true`/`false`) or drop (`null`) an admin override; resolves once the request path
   * sees it, so an operator's kill switch applies to the very next request.
   */
  async override (key: string, enabled: boolean | null): Promise<void> {
    if (enabled === null) this.sources.overrides.delete(key)
    else this.sources.overrides.set(key, enabled)
    this.provider.changed([key])
    await this.settled()
  }

  /**
   * Whether some source other than an override defines `key`. With a flag provider, a key the
   * config uses counts as defined even before the provider has answered: its flags are known
   * only once it runs, and an operator's override of such a flag must neither be refused nor
   * dropped at a restart while the flag service is down.
   */
  defines (key: string): boolean {
    return this.sources.defines(key) || (this.config.flagProvider !== null && this.keysInUse().has(key))
  }

  /** Apply a reloaded config: new `featureFlags`, maybe a different flag file or provider. */
  async apply (config: Config): Promise<void> {
    this.config = config
    this.sources.featureFlags = config.featureFlags
    if (this.watcher?.path !== config.flagSource?.path) {
      this.watcher?.stop()
      this.watcher = null
      this.sources.file = null
      this.watch(config)
    }
    await this.fileRead
    await this.adopting
    const wanted = this.nextService ?? this.flagService
    if (JSON.stringify(wanted?.config ?? null) !== JSON.stringify(config.flagProvider)) {
      const warming = this.nextService
      this.nextService = null
      void warming?.close()
      const running = this.flagService
      if (running !== null && JSON.stringify(running.config) === JSON.stringify(config.flagProvider)) {
        // Back to the provider that is running: it stays, and only the one warming goes. A
        // second instance of it would hold a second set of streams and watchers, and the
        // first would never be closed until that one had read.
        this.logger.info({ event: 'flag_source', module: running.config.module }, 'flag provider change undone before the new one was ready; the running one stays')
        await withinReload(running.read())
      } else if (config.flagProvider === null) {
        // Dropped: the provider's flags go now, as the config says.
        await this.flagService?.close()
        this.flagService = null
        this.sources.provider = null
      } else {
        await withinReload(this.connect(config))
      }
    } else {
      // Code defaults and the keys in use may have changed.
      await withinReload(this.flagService?.read())
    }
    this.provider.changed(Object.keys(config.featureFlags))
    await this.settled()
  }

  /** Resolves once the snapshot reflects every change announced so far. */
  async settled (): Promise<void> {
    await this.refresh()
  }

  /** Every flag key the config uses: kill switches, fault flags, trigger flags, `featureFlags`. */
  private keysInUse (): Set<string> {
    const keys = flagKeysRead(this.config)
    for (const key of Object.keys(this.config.featureFlags)) keys.add(key)
    return keys
  }

  /**
   * Start the configured provider: at start-up it is the provider at once; on a reload that
   * changes it, it warms up beside the running one (`nextService`) and takes over at its first
   * read. One that cannot start is logged and counted; what runs keeps running.
   */
  private async connect (config: Config, atStart = false): Promise<void> {
    if (config.flagProvider === null) return
    const service: ProviderSource = new ProviderSource(config.flagProvider, this.logger, this.featureLogger, {
      keys: () => this.keysInUse(),
      codeDefault: (key) => this.sources.codeDefault(key),
      onFlags: (flags) => {
        if (service === this.nextService) {
          const running = this.flagService
          this.flagService = service
          this.nextService = null
          this.logger.info({ event: 'flag_source', module: service.config.module }, 'flag provider replaced: the new one has read its flags')
          void running?.close()
        }
        if (service !== this.flagService) return
        this.sources.provider = flags
        this.provider.changed([...flags.keys()])
      },
      onError: () => { this.providerErrors++ }
    })
    if (this.flagService === null) this.flagService = service
    else this.nextService = service
    try {
      await service.start()
    } catch (err) {
      if (atStart) throw err
      this.providerErrors++
      if (service === this.nextService) {
        this.nextService = null
        this.logger.error({ event: 'flag_source', err }, 'new flag provider not started; the running one keeps serving')
      } else if (service === this.flagService) {
        this.flagService = null
        this.logger.error({ event: 'flag_source', err }, 'flag provider not started; serving on the other flag sources')
      }
    }
  }

  private watch (config: Config): void {
    const source = config.flagSource
    if (source === null) return
    const watcher: FlagFileWatcher = new FlagFileWatcher(source.path, source.pollIntervalMs, {
      onFlags: (flags: FileFlags | null) => {
        this.adopting = this.adopting.then(async () => { await this.adopt(watcher, flags) })
      },
      onError: (error: string) => { this.fileError(source.path, error) },
      onPresence: (present: boolean) => {
        if (present) this.logger.info({ event: 'flag_source', path: source.path }, 'flag file appeared')
        else this.logger.warn({ event: 'flag_source', path: source.path }, 'flag file missing; keeping the last good flags')
      }
    })
    this.watcher = watcher
    this.fileRead = watcher.start()
  }

  /** Take a flag file read: with targeted flags, first have flagd-core compile it. */
  private async adopt (watcher: FlagFileWatcher, flags: FileFlags | null): Promise<void> {
    const notBoolean = flags === null ? null : notBooleanProblem(flags, flagKeysRead(this.config))
    if (notBoolean !== null) { this.fileError(watcher.path, notBoolean); return }
    if (flags !== null && flags.targeted.size > 0) {
      try {
        flags.targeting = await compileTargeting(flags.text, this.featureLogger)
      } catch (err) {
        this.fileError(watcher.path, (err as Error).message)
        return
      }
      // Adopted all the same, as flagd does: such a flag gets the code default. Said and counted.
      for (const key of uncompilable(flags.targeting, flags.targeted)) {
        this.fileErrors++
        this.logger.error({ event: 'flag_source', path: watcher.path, flag: key }, 'flagd cannot compile this flag\'s targeting; it gets the code default, as in flagd')
      }
    }
    if (this.watcher !== watcher) return // replaced by a reload meanwhile
    this.sources.file = flags
    if (flags !== null) {
      this.logger.info({ event: 'flag_source', path: watcher.path, flags: flags.values.size + flags.disabled.size + flags.targeted.size, targeted: flags.targeted.size }, 'flag file loaded')
    }
    this.provider.changed(flags === null ? [] : [...flags.values.keys(), ...flags.disabled, ...flags.targeted])
  }

  private fileError (path: string, error: string): void {
    this.fileErrors++
    this.logger.error({ event: 'flag_source', path, error }, 'flag file ignored; keeping the last good flags')
  }

  /** Re-evaluate every known flag through OpenFeature and swap the snapshot in. */
  private async refresh (): Promise<void> {
    const version = ++this.version
    const run = this.refreshing.then(async () => {
      const client = this.client
      if (client === null || version !== this.version) return
      const next = new Map<string, boolean>()
      for (const key of this.sources.keys()) next.set(key, await client.getBooleanValue(key, true))
      // A flag the config reads that no source defines any more (dropped from the flag file)
      // stays in the snapshot, on, as the request path reads it (`enabled`): its kill switch
      // coming back on is logged, kept for triage and still has its metric.
      for (const key of flagKeysRead(this.config)) if (!next.has(key)) next.set(key, true)
      let targeted: Map<string, TargetedFlag> | null = null
      for (const key of next.keys()) {
        const targeting = this.sources.resolve(key)?.targeting ?? null
        if (targeting === null) continue
        targeted ??= new Map()
        targeted.set(key, new TargetedFlag(key, targeting, this.sources.codeDefault(key), this.config.flags.targetingKeyHeader, this.featureLogger))
      }
      const prev = this.values
      // Both swapped together, with no await between: a request sees one snapshot.
      this.values = next
      this.targeted = targeted
      for (const [key, value] of next) {
        if (prev.get(key) !== value && prev.size > 0) {
          this.changes.push({ flag: key, enabled: value, at: Date.now() })
          if (this.changes.length > 200) this.changes.shift()
          this.logger.warn({ event: 'flag_changed', flag: key, enabled: value, origin: this.sources.resolve(key)?.origin ?? 'default' }, value ? 'flag on' : 'flag off')
        }
      }
    })
    this.refreshing = run.catch((err: unknown) => { this.logger.error({ event: 'flag_source', err }, 'flag refresh failed') })
    await this.refreshing
  }

  async close (): Promise<void> {
    this.watcher?.stop()
    this.watcher = null
    await Promise.all([this.flagService?.close(), this.nextService?.close()])
    this.flagService = this.nextService = null
    // Release this sidecar's domain only: other sidecars in the process keep theirs.
    await OpenFeature.setProviderAndWait(this.domain, NOOP_PROVIDER).catch(() => {})
  }
}

/**
 * How long a reload waits on a flag provider (a new one starting, a read of the running one)
 * before it answers: operators never wait on a flag service (SPEC §15). A healthy in-process
 * provider is done well within it, so the reload's answer reflects it; the rest of a slow one's
 * work finishes in the background and applies when it does.
 */
const RELOAD_WAIT_MS = 50

async function withinReload (work: Promise<void> | undefined): Promise<void> {
  if (work === undefined) return
  let timer: NodeJS.Timeout | undefined
  await Promise.race([work, new Promise<void>((resolve) => { timer = setTimeout(resolve, RELOAD_WAIT_MS) })])
  clearTimeout(timer)
}
