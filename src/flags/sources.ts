/**
 * The flag sources and their precedence (SPEC §13, §16), highest first:
 * admin override > flag provider (`flagProvider`) > flag file (`flagSource`) > `featureFlags`.
 * A key a source does not define falls through to the next one; a flag that flagd resolves to
 * the *code default* (DISABLED, no default variant, a broken rule) resolves to `featureFlags`,
 * else `true`, as flagd does.
 */
import type { FileFlags } from './flagd-file.js'
import type { FlagdEvaluator } from './targeting.js'

export type FlagOrigin = 'override' | 'provider' | 'file' | 'config' | 'default'

export interface Resolution {
  /** The value; for a targeted flag, its value for a request that carries no context. */
  value: boolean
  origin: FlagOrigin
  /** Set when the value depends on the request: the flagd-core that evaluates its targeting. */
  targeting: FlagdEvaluator | null
}

/** One flag as a flag provider reported it at its last read. */
export interface ProviderFlag {
  /** null: the provider resolves it to the code default (DISABLED, or an error flagd maps so). */
  value: boolean | null
  /** Set when the provider evaluates it with targeting and Breakwater can do so synchronously. */
  targeting: FlagdEvaluator | null
}

const NO_CONTEXT = Object.freeze({})

export class FlagSources {
  featureFlags: Readonly<Record<string, boolean>>
  file: FileFlags | null = null
  /** The flag provider's flags at its last read; null without a provider. */
  provider: ReadonlyMap<string, ProviderFlag> | null = null
  readonly overrides = new Map<string, boolean>()

  constructor (featureFlags: Readonly<Record<string, boolean>>) {
    this.featureFlags = featureFlags
  }

  /** Every key some source defines. */
  keys (): Set<string> {
    const keys = new Set(Object.keys(this.featureFlags))
    if (this.provider !== null) for (const k of this.provider.keys()) keys.add(k)
    if (this.file !== null) {
      for (const k of this.file.values.keys()) keys.add(k)
      for (const k of this.file.disabled) keys.add(k)
      for (const k of this.file.targeted) keys.add(k)
    }
    for (const k of this.overrides.keys()) keys.add(k)
    return keys
  }

  /** Whether a source other than an override defines `key`. */
  defines (key: string): boolean {
    return Object.hasOwn(this.featureFlags, key) || this.provider?.has(key) === true ||
      (this.file !== null && (this.file.values.has(key) || this.file.disabled.has(key) || this.file.targeted.has(key)))
  }

  /** What flagd calls the code default of `key`: the `featureFlags` value, else on. */
  codeDefault (key: string): boolean {
    return Object.hasOwn(this.featureFlags, key) ? this.featureFlags[key] as boolean : true
  }

  resolve (key: string): Resolution | null {
    const override = this.overrides.get(key)
    if (override !== undefined) return { value: override, origin: 'override', targeting: null }
    const fromProvider = this.provider?.get(key)
    if (fromProvider !== undefined) return this.defined(key, fromProvider.value, fromProvider.targeting, 'provider')
    if (this.file !== null) {
      if (this.file.targeted.has(key) && this.file.targeting !== null) return this.defined(key, null, this.file.targeting, 'file')
      const fromFile = this.file.values.get(key)
      if (fromFile !== undefined) return this.defined(key, fromFile, null, 'file')
      if (this.file.disabled.has(key)) return this.defined(key, null, null, 'file')
    }
    if (Object.hasOwn(this.featureFlags, key)) return { value: this.featureFlags[key] as boolean, origin: 'config', targeting: null }
    return null
  }

  private defined (key: string, value: boolean | null, targeting: FlagdEvaluator | null, origin: FlagOrigin): Resolution {
    if (targeting !== null) return { value: targeting.resolveBooleanEvaluation(key, this.codeDefault(key), NO_CONTEXT).value, origin, targeting }
    if (value !== null) return { value, origin, targeting: null }
    const configured = Object.hasOwn(this.featureFlags, key)
    return { value: this.codeDefault(key), origin: configured ? 'config' : 'default', targeting: null }
  }
}
