/**
 * What an operator command loads. `breakwater kill …` reads the admin address and token from
 * the config with a light reader (`admin-settings.ts`: YAML, `${ENV}`, three keys) instead of
 * the config compiler, and talks to the sidecar over `node:http`:
 *
 * 1. the light reader finds exactly what the full loader resolves for the same file (the
 *    defaults come from one place), for YAML, JSON and `.mjs` configs;
 * 2. the modules an operator command can reach import neither the schema (TypeBox), nor an
 *    HTTP client or server library, nor the logger or metrics: checked on the compiled import
 *    graph, so that a convenient import cannot bring them back unnoticed.
 */
import t from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { stringify } from 'yaml'
import { loadConfigFile } from '../src/config/load.js'
import { readAdminSettings, type AdminSettings } from '../src/config/admin-settings.js'
import { ConfigError } from '../src/config/read.js'
import { tempDir } from './helpers/process.js'

const MINIMAL = {
  service: 'light',
  upstreams: { app: { url: 'http://127.0.0.1:3000' } },
  routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }]
}

/** The same four values, from the full loader. */
async function fromLoader (path: string, env: NodeJS.ProcessEnv): Promise<AdminSettings> {
  const { config } = await loadConfigFile(path, env)
  return {
    admin: { host: config.listen.admin.host, port: config.listen.admin.port },
    tokenFile: config.admin.tokenFile,
    stateDir: config.stateDir,
    generatedTokenFile: join(config.stateDir, 'admin.token')
  }
}

t.test('the light reader resolves what the loader resolves', async (t) => {
  const dir = tempDir(t)
  const cases: Array<{ name: string, file: string, text: string, env?: NodeJS.ProcessEnv }> = [
    { name: 'every default', file: 'defaults.yaml', text: stringify(MINIMAL) },
    {
      name: 'relative paths resolve against the config file',
      file: 'relative.yaml',
      text: stringify({ ...MINIMAL, stateDir: 'state', admin: { tokenFile: '../secrets/admin.token' }, listen: { admin: { host: '::1', port: 15000 } } })
    },
    {
      name: '${ENV} with defaults and set variables; a numeric string port',
      file: 'env.yaml',
      text: [
        'service: light',
        'stateDir: ${STATE:-./from-default}',
        'listen:',
        '  admin: { host: "${ADMIN_HOST}", port: "${ADMIN_PORT:-14999}" }',
        'admin: { tokenFile: "${TOKEN_DIR}/token" }',
        'upstreams: { app: { url: "http://127.0.0.1:3000" } }',
        'routes: [{ match: { pathPrefix: / }, upstream: app }]'
      ].join('\n'),
      env: { ADMIN_HOST: '127.0.0.2', TOKEN_DIR: '/run/secrets' }
    },
    { name: 'JSON', file: 'config.json', text: JSON.stringify({ ...MINIMAL, listen: { admin: { port: 14111 } } }) },
    { name: '.mjs', file: 'config.mjs', text: `export default () => (${JSON.stringify({ ...MINIMAL, stateDir: '/var/lib/bw' })})\n` }
  ]
  for (const c of cases) {
    const path = join(dir, c.file)
    writeFileSync(path, c.text)
    const env = c.env ?? {}
    t.same(await readAdminSettings(path, env), await fromLoader(path, env), c.name)
  }
})

t.test('the light reader looks only at its keys, and names a wrong one', async (t) => {
  const dir = tempDir(t)
  // A problem elsewhere (an unknown upstream) does not stop an operator from reaching the sidecar.
  const elsewhere = join(dir, 'elsewhere.yaml')
  writeFileSync(elsewhere, stringify({ ...MINIMAL, routes: [{ match: { pathPrefix: '/' }, upstream: 'nowhere' }], listen: { admin: { port: 14123 } } }))
  t.same((await readAdminSettings(elsewhere, {})).admin, { host: '127.0.0.1', port: 14123 })

  const wrong = join(dir, 'wrong.yaml')
  writeFileSync(wrong, stringify({ ...MINIMAL, listen: { admin: { port: 'admin' } }, admin: { tokenFile: 7 } }))
  const err = await readAdminSettings(wrong, {}).then(() => null, (e: unknown) => e)
  t.ok(err instanceof ConfigError, 'a ConfigError')
  t.same((err as ConfigError).problems, ['listen.admin.port: must be an integer from 0 to 65535', 'admin.tokenFile: must be a string'])
  const missing = await readAdminSettings(join(dir, 'nope.yaml'), {}).then(() => null, (e: unknown) => e)
  t.match((missing as ConfigError).problems, [/file not found/])
})

// ---------------------------------------------------------------------------
// The import graph of an operator command, read from the compiled modules.
// ---------------------------------------------------------------------------

const compiledSrc = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'src')

/** Module specifiers a compiled file imports: static imports and re-exports, and `import('literal')`. */
function specifiers (file: string): string[] {
  const text = readFileSync(file, 'utf8')
  const found: string[] = []
  for (const m of text.matchAll(/^\s*(?:import|export)\s+(?:[^'"]*?\s+from\s+)?['"]([^'"]+)['"]/gm)) found.push(m[1] as string)
  for (const m of text.matchAll(/\bimport\(\s*['"]([^'"]+)['"]\s*\)/g)) found.push(m[1] as string)
  return found
}

/** The package a bare specifier names: `undici/lib/dispatcher/pool.js` is `undici`. */
function packageOf (spec: string): string {
  const parts = spec.split('/')
  return spec.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0] as string
}

/** Every package and project module reachable from `entry` (project modules as paths under src/). */
function reachable (entry: string): { modules: string[], packages: string[] } {
  const modules = new Set<string>()
  const packages = new Set<string>()
  const visit = (file: string): void => {
    const rel = file.slice(compiledSrc.length + 1)
    if (modules.has(rel)) return
    modules.add(rel)
    for (const spec of specifiers(file)) {
      if (spec.startsWith('.')) visit(resolve(dirname(file), spec))
      else packages.add(packageOf(spec))
    }
  }
  visit(join(compiledSrc, entry))
  return { modules: [...modules].sort(), packages: [...packages].sort() }
}

t.test('an operator command loads neither the config compiler nor an HTTP library', async (t) => {
  const { modules, packages } = reachable('operator/commands.js')
  const allowed = (p: string): boolean => p.startsWith('node:') || p === 'yaml'
  t.same(packages.filter((p) => !allowed(p)), [], `only node: modules and yaml (${packages.join(', ')})`)
  t.same(modules.filter((m) => /^config\/(load|schema|build)\.js$/.test(m)), [], 'not the config loader or its schema')
  t.ok(modules.includes('config/admin-settings.js'), `the light reader is what it uses (${modules.join(', ')})`)

  // The command line itself loads a command's modules only when that command runs.
  const cli = specifiers(join(compiledSrc, 'cli.js'))
  const eager = readFileSync(join(compiledSrc, 'cli.js'), 'utf8').match(/^\s*import\s+[^(]*?['"]([^'"]+)['"]/gm) ?? []
  t.same(eager.filter((line) => !/['"]node:/.test(line)), [], 'cli.js imports only node: modules up front')
  t.ok(cli.includes('./operator/commands.js'), 'and the operator commands on demand')
})

t.test('the walker sees what it is for', async (t) => {
  const { packages, modules } = reachable('main.js')
  t.ok(packages.includes('@sinclair/typebox'), 'the schema, from start')
  t.ok(packages.includes('undici') && packages.includes('fastify'), 'the HTTP libraries, from start')
  t.ok(modules.includes('config/load.js'))
})
