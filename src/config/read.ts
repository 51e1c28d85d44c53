/**
 * Reading a config file, before any checking: shared by the loader (`load.ts`) and by the CLI's
 * light reader of the admin address (`admin-settings.ts`), which must not load the schema.
 */
import { readFile } from 'node:fs/promises'
import { extname } from 'node:path'
import { pathToFileURL } from 'node:url'

/** A config that cannot be used; `problems` holds one line per problem, each naming its key path. */
export class ConfigError extends Error {
  readonly problems: readonly string[]
  constructor (problems: string[]) {
    super(problems.length === 1 ? problems[0] as string : `${problems.length} problems in the configuration:\n${problems.join('\n')}`)
    this.name = 'ConfigError'
    this.problems = problems
  }
}

/**
 * A config file as its author wrote it: YAML, JSON, or what an `.mjs` module exports (a value, or
 * a function that returns one). Nothing is checked or expanded. Throws `ConfigError`.
 */
export async function readConfigSource (path: string): Promise<unknown> {
  const ext = extname(path).toLowerCase()
  if (ext === '.mjs' || ext === '.js') {
    let mod: Record<string, unknown>
    try {
      mod = await import(`${pathToFileURL(path).href}?t=${Date.now()}`) as Record<string, unknown>
    } catch (err) {
      throw new ConfigError([`${path}: cannot load module: ${(err as Error).message}`])
    }
    const exported = mod.default ?? mod.config
    if (exported === undefined) throw new ConfigError([`${path}: exports no config (a default export, or one named config)`])
    let value: unknown = exported
    if (typeof exported === 'function') {
      try {
        value = await (exported as () => unknown)()
      } catch (err) {
        // Named like a module that fails to load: a bare "boom" on stderr names no file.
        throw new ConfigError([`${path}: the exported function failed: ${(err as Error).message}`])
      }
    }
    const odd = notData(value, '')
    if (odd.length > 0) throw new ConfigError(odd)
    return value
  }
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    throw new ConfigError([`${path}: ${code === 'ENOENT' ? 'file not found' : `cannot read: ${(err as Error).message}`}`])
  }
  try {
    if (ext === '.json') return JSON.parse(text)
    if (ext === '.yaml' || ext === '.yml' || ext === '') {
      // Loaded only for a YAML file: a JSON or .mjs config never needs the parser.
      const { parse } = await import('yaml')
      return parse(text, { prettyErrors: true })
    }
  } catch (err) {
    throw new ConfigError([`${path}: not valid ${ext === '.json' ? 'JSON' : 'YAML'}: ${(err as Error).message.split('\n')[0]}`])
  }
  throw new ConfigError([`${path}: unsupported config file type "${ext}" (use .yaml, .yml, .json or .mjs)`])
}

/**
 * Values a module may hold that a config cannot (a function, a symbol, a bigint), each named by
 * its key: they would otherwise fail later as "could not be cloned", naming none.
 */
function notData (value: unknown, path: string): string[] {
  const kind = typeof value
  if (kind === 'function' || kind === 'symbol' || kind === 'bigint') return [`${path === '' ? '(root)' : path}: a ${kind} is not a config value (write the value itself)`]
  if (Array.isArray(value)) return value.flatMap((item, i) => notData(item, `${path}[${i}]`))
  if (value !== null && kind === 'object') return Object.entries(value as Record<string, unknown>).flatMap(([key, item]) => notData(item, path === '' ? key : `${path}.${key}`))
  return []
}
