/**
 * What the package promises besides its code: the license it names is the one it ships, and
 * every production dependency runs on every Node version that package.json's `engines`
 * claims (its lowest, and 24, the Docker image's).
 */
import t from 'tap'
import { createHash } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import semver from 'semver'
import { ROOT } from './helpers/root.js'

const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { license: string, engines: { node: string } }

interface LockEntry { version?: string, dev?: boolean, engines?: Record<string, string> | string[] }
type Lock = { packages: Record<string, LockEntry> }

t.test('LICENSE is the full Apache License 2.0 that package.json names', async (t) => {
  t.equal(pkg.license, 'Apache-2.0', 'package.json says Apache-2.0')
  const path = join(ROOT, 'LICENSE')
  t.ok(existsSync(path), 'LICENSE exists')
  if (!existsSync(path)) return
  const text = readFileSync(path, 'utf8')
  t.match(text, /^\s+Apache License\n\s+Version 2\.0, January 2004\n/, 'starts with the title and version')
  for (const section of ['1. Definitions.', '4. Redistribution.', '9. Accepting Warranty or Additional Liability.', 'END OF TERMS AND CONDITIONS', 'APPENDIX: How to apply the Apache License to your work.']) {
    t.ok(text.includes(section), `has "${section}"`)
  }
  // The SHA-256 of the text as the ASF publishes it (LICENSE-2.0.txt): not one word changed.
  t.equal(createHash('sha256').update(text).digest('hex'), 'cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30', 'byte for byte the published text')
})

/** The Node versions `engines.node` promises and CI or the image run: its lowest, and 24.0.0. */
function promisedVersions (range: string): string[] {
  const lowest = semver.minVersion(range)?.version
  return [lowest, '24.0.0'].filter((v): v is string => v !== undefined && semver.satisfies(v, range))
}

/** `name@version wants node RANGE` for every production package whose engines exclude one of `versions`. */
function enginesProblems (lock: Lock, versions: string[], installed: (path: string) => LockEntry | null = () => null): string[] {
  const problems: string[] = []
  for (const [path, entry] of Object.entries(lock.packages)) {
    if (path === '' || entry.dev === true) continue
    const engines = installed(path)?.engines ?? entry.engines
    const range = Array.isArray(engines) ? undefined : engines?.node
    if (range === undefined) continue
    const name = path.slice(path.lastIndexOf('node_modules/') + 'node_modules/'.length)
    for (const v of versions) {
      if (!semver.satisfies(v, range)) problems.push(`${name}@${entry.version ?? '?'} wants node ${range}, excluding ${v}`)
    }
  }
  return problems
}

t.test('no production dependency excludes a Node version engines claims', async (t) => {
  const versions = promisedVersions(pkg.engines.node)
  t.same(versions, ['20.18.1', '24.0.0'], `engines.node ${pkg.engines.node} claims ${versions.join(' and ')}`)
  const lock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as Lock
  const production = Object.keys(lock.packages).filter((p) => p !== '' && lock.packages[p]?.dev !== true)
  t.ok(production.length > 20, `${production.length} production packages in the lockfile`)
  // What is installed, where it is (npm ci installs the lockfile; read both in case they differ).
  const installed = (path: string): LockEntry | null => {
    const file = join(ROOT, path, 'package.json')
    return existsSync(file) ? JSON.parse(readFileSync(file, 'utf8')) as LockEntry : null
  }
  t.same(enginesProblems(lock, versions, installed), [], 'every engines.node range includes them')

  // cookie 2 (ESM only, Node >= 22) came in through fastify → light-my-request; the override
  // keeps it on cookie 1, whose API light-my-request uses (stringifySetCookie) is the same.
  const cookie = Object.entries(lock.packages).find(([p]) => p.endsWith('node_modules/cookie'))
  t.match(cookie?.[1].version ?? '', /^1\./, `cookie is ${cookie?.[1].version ?? 'absent'} (${cookie?.[0] ?? ''})`)
})

t.test('the engines check reports a dependency that excludes a promised version', async (t) => {
  const lock: Lock = {
    packages: {
      '': { version: '0.1.0' },
      'node_modules/light-my-request/node_modules/cookie': { version: '2.0.2', engines: { node: '>=22' } },
      'node_modules/tap': { version: '21.8.0', dev: true, engines: { node: '>=99' } },
      'node_modules/undici': { version: '7.30.2', engines: { node: '>=20.18.1' } }
    }
  }
  t.same(enginesProblems(lock, ['20.18.1', '24.0.0']), ['cookie@2.0.2 wants node >=22, excluding 20.18.1'], 'cookie 2 is reported; dev-only packages are not')
  t.same(enginesProblems(lock, ['20.18.0']), ['cookie@2.0.2 wants node >=22, excluding 20.18.0', 'undici@7.30.2 wants node >=20.18.1, excluding 20.18.0'], 'a lower version finds undici too')
})
