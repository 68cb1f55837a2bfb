import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { ESLint } from 'eslint';
import { describe, expect, it } from 'vitest';

// The repo's own eslint.config.js on made-up files: error codes come from the catalogue.
const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const eslint = new ESLint({ cwd: ROOT });

async function ruleIds(file: string, code: string): Promise<(string | null)[]> {
  const [result] = await eslint.lintText(code, { filePath: path.join(ROOT, file) });
  return (result?.messages ?? []).map((m) => m.ruleId);
}

describe('error codes come from src/errors.ts', () => {
  it('refuses a GW_ERR_ string in src/', async () => {
    expect(await ruleIds('src/gateway/x.ts', "export const code = 'GW_ERR_AUTH_FAILED';\n")).toEqual([
      'no-restricted-syntax',
    ]);
  });

  it('accepts the catalogue, and the literals in src/errors.ts itself and in tests', async () => {
    const viaCatalogue =
      "import { ErrorCodes } from '../errors.js';\nexport const code = ErrorCodes.AUTH_FAILED;\n";
    expect(await ruleIds('src/gateway/x.ts', viaCatalogue)).toEqual([]);
    expect(await ruleIds('src/errors.ts', "export const code = 'GW_ERR_AUTH_FAILED';\n")).toEqual([]);
    expect(await ruleIds('test/x.test.ts', "export const code = 'GW_ERR_AUTH_FAILED';\n")).toEqual([]);
  });
});
