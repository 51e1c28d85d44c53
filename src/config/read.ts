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
    if (typeof exported !== 'function') return exported
    try {
      return await (exported as () => unknown)()
    } catch (err) {
      // Named like a module that fails to load: a bare "boom" on stderr names no file.
      throw new ConfigError([`${path}: the exported function failed: ${(err as Error).message}`])
    }
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
