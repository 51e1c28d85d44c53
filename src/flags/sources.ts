/**
 * The three flag sources and their precedence (SPEC §13), highest first:
 * admin override > flag file (`flagSource`) > `featureFlags`. A key the file drops falls back
 * to `featureFlags`; a flag the file marks DISABLED resolves to the code default
 * (`featureFlags`, else `true`), as flagd does.
 */
import type { FileFlags } from '../config/flag-file.js'

export type FlagOrigin = 'override' | 'file' | 'config' | 'default'

export interface Resolution {
  value: boolean
  origin: FlagOrigin
}

export class FlagSources {
  featureFlags: Readonly<Record<string, boolean>>
  file: FileFlags | null = null
  readonly overrides = new Map<string, boolean>()

  constructor (featureFlags: Readonly<Record<string, boolean>>) {
    this.featureFlags = featureFlags
  }

  /** Every key some source defines. */
  keys (): Set<string> {
    const keys = new Set(Object.keys(this.featureFlags))
    if (this.file !== null) {
      for (const k of this.file.values.keys()) keys.add(k)
      for (const k of this.file.disabled) keys.add(k)
    }
    for (const k of this.overrides.keys()) keys.add(k)
    return keys
  }

  has (key: string): boolean {
    return this.overrides.has(key) || Object.hasOwn(this.featureFlags, key) ||
      (this.file !== null && (this.file.values.has(key) || this.file.disabled.has(key)))
  }

  resolve (key: string): Resolution | null {
    const override = this.overrides.get(key)
    if (override !== undefined) return { value: override, origin: 'override' }
    const configured = Object.hasOwn(this.featureFlags, key) ? this.featureFlags[key] : undefined
    if (this.file !== null) {
      const fromFile = this.file.values.get(key)
      if (fromFile !== undefined) return { value: fromFile, origin: 'file' }
      if (this.file.disabled.has(key)) return { value: configured ?? true, origin: configured === undefined ? 'default' : 'config' }
    }
    if (configured !== undefined) return { value: configured, origin: 'config' }
    return null
  }
}
