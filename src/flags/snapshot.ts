/**
 * The flag snapshot the request path reads. OpenFeature evaluation is asynchronous and costs
 * tens of microseconds a call; a kill switch must cost nanoseconds. So: on every
 * `ConfigurationChanged` from the provider, every known flag is evaluated once through the
 * OpenFeature client and a new `Map` swapped in; a request does one `Map.get`.
 */
import { randomBytes } from 'node:crypto'
import { OpenFeature, ProviderEvents, NOOP_PROVIDER, type Client } from '@openfeature/server-sdk'
import type { Logger } from 'pino'
import type { Config } from '../config/types.js'
import { FlagSources } from './sources.js'
import { BreakwaterProvider } from './provider.js'
import { FlagFileWatcher } from './flagd-file.js'
import type { FileFlags } from '../config/flag-file.js'

export class FlagSnapshot {
  /** key → enabled. Read per request; replaced whole, never mutated. */
  values: ReadonlyMap<string, boolean> = new Map()
  readonly sources: FlagSources
  /** Recent changes of what the request path sees (for triage), oldest first, bounded. */
  readonly changes: Array<{ flag: string, enabled: boolean, at: number }> = []
  /** Flag file problems (unreadable, unparsable): counted, last good flags kept. */
  fileErrors = 0
  private readonly provider: BreakwaterProvider
  private readonly domain = `breakwater-${randomBytes(6).toString('hex')}`
  private client: Client | null = null
  private watcher: FlagFileWatcher | null = null
  private refreshing: Promise<void> = Promise.resolve()
  private version = 0

  constructor (config: Config, private readonly logger: Logger) {
    this.sources = new FlagSources(config.featureFlags)
    this.provider = new BreakwaterProvider(this.sources)
  }

  /** Register the provider, read the flag file, build the first snapshot. */
  async start (config: Config): Promise<void> {
    await OpenFeature.setProviderAndWait(this.domain, this.provider)
    this.client = OpenFeature.getClient(this.domain)
    this.client.addHandler(ProviderEvents.ConfigurationChanged, () => { void this.refresh() })
    this.watch(config)
    await this.refresh()
  }

  /** Whether a route guarded by `key` may be served. Unknown keys are on. */
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

  /** Whether some source other than an override defines `key`. */
  defines (key: string): boolean {
    return Object.hasOwn(this.sources.featureFlags, key) ||
      (this.sources.file !== null && (this.sources.file.values.has(key) || this.sources.file.disabled.has(key)))
  }

  /** Apply a reloaded config: new `featureFlags`, maybe a different flag file. */
  async apply (config: Config): Promise<void> {
    this.sources.featureFlags = config.featureFlags
    if (this.watcher?.path !== config.flagSource?.path) {
      this.watcher?.stop()
      this.watcher = null
      this.sources.file = null
      this.watch(config)
    }
    this.provider.changed(Object.keys(config.featureFlags))
    await this.settled()
  }

  /** Resolves once the snapshot reflects every change announced so far. */
  async settled (): Promise<void> {
    await this.refresh()
  }

  private watch (config: Config): void {
    const source = config.flagSource
    if (source === null) return
    this.watcher = new FlagFileWatcher(source.path, source.pollIntervalMs, {
      onFlags: (flags: FileFlags | null) => {
        this.sources.file = flags
        if (flags !== null) {
          for (const key of flags.targeted) this.logger.warn({ event: 'flag_source', flag: key, path: source.path }, 'targeting rules are not evaluated per request; the default variant applies')
          this.logger.info({ event: 'flag_source', path: source.path, flags: flags.values.size + flags.disabled.size }, 'flag file loaded')
        }
        this.provider.changed(flags === null ? [] : [...flags.values.keys(), ...flags.disabled])
      },
      onError: (error: string) => {
        this.fileErrors++
        this.logger.error({ event: 'flag_source', path: source.path, error }, 'flag file ignored; keeping the last good flags')
      },
      onPresence: (present: boolean) => {
        if (present) this.logger.info({ event: 'flag_source', path: source.path }, 'flag file appeared')
        else this.logger.warn({ event: 'flag_source', path: source.path }, 'flag file missing; keeping the last good flags')
      }
    })
    this.watcher.start()
  }

  /** Re-evaluate every known flag through OpenFeature and swap the snapshot in. */
  private async refresh (): Promise<void> {
    const version = ++this.version
    const run = this.refreshing.then(async () => {
      const client = this.client
      if (client === null || version !== this.version) return
      const next = new Map<string, boolean>()
      for (const key of this.sources.keys()) next.set(key, await client.getBooleanValue(key, true))
      const prev = this.values
      this.values = next
      for (const [key, value] of next) {
        if (prev.get(key) !== value && prev.size > 0) {
          this.changes.push({ flag: key, enabled: value, at: Date.now() })
          if (this.changes.length > 200) this.changes.shift()
          this.logger.warn({ event: 'flag_changed', flag: key, enabled: value, origin: this.sources.resolve(key)?.origin }, value ? 'flag on' : 'flag off')
        }
      }
    })
    this.refreshing = run.catch((err: unknown) => { this.logger.error({ event: 'flag_source', err }, 'flag refresh failed') })
    await this.refreshing
  }

  async close (): Promise<void> {
    this.watcher?.stop()
    this.watcher = null
    // Release this sidecar's domain only: other sidecars in the process keep theirs.
    await OpenFeature.setProviderAndWait(this.domain, NOOP_PROVIDER).catch(() => {})
  }
}
