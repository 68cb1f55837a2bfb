import js from '@eslint/js';
import tseslint from 'typescript-eslint';

const SQL_PARAMETERS = {
  selector:
    'CallExpression[callee.property.name=/^(prepare|query|exec)$/] > TemplateLiteral[expressions.length>0]',
  message: 'SQL must use parameters, not template literals (identifiers only from constants).',
};
const ERROR_CODE_LITERAL = {
  selector: 'Literal[value=/^GW_ERR_/]',
  message: 'Use the ErrorCodes catalogue (src/errors.ts), not a GW_ERR_ string.',
};

// Imports point down (docs/architecture.md): gateway → providers → store → config/common.
// Each entry names what one layer may not import; a layer's restrictions are listed once.
const UP = {
  gateway: {
    group: ['**/gateway/**'],
    message: 'Only src/gateway/ composes the gateway; pass what you need in.',
  },
  providers: {
    group: ['**/providers/**'],
    message: 'Providers sit above this layer; depend on src/common/ instead.',
  },
  store: {
    group: ['**/store/**'],
    message: 'The store sits above this layer; depend on src/common/ instead.',
  },
  commands: { group: ['**/commands/**'], message: 'Commands are the top layer; nothing imports them.' },
  // config/schema.ts assembles the per-provider settings schemas, so config may reach those only.
  providersExceptSettings: {
    regex: '(^|/)providers/(?!([^/]+/)?settings\\.js$)',
    message:
      'Config may import only the providers’ settings schemas (src/providers/settings.ts, src/providers/*/settings.ts).',
  },
};
const layers = {
  'src/store/**': [UP.gateway, UP.providers, UP.commands],
  'src/common/**': [UP.gateway, UP.providers, UP.store, UP.commands],
  'src/config/**': [UP.gateway, UP.providersExceptSettings, UP.store, UP.commands],
  'src/providers/**': [UP.gateway, UP.commands, UP.store],
};

export default tseslint.config(
  { ignores: ['dist/', 'dist-bench/', 'node_modules/', 'data/', 'test-output/', 'src/gateway/dashboard/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      'no-restricted-syntax': ['error', SQL_PARAMETERS],
    },
  },
  {
    files: ['src/**'],
    ignores: ['src/errors.ts'],
    rules: { 'no-restricted-syntax': ['error', SQL_PARAMETERS, ERROR_CODE_LITERAL] },
  },
  ...Object.entries(layers).map(([files, patterns]) => ({
    files: [files],
    rules: { 'no-restricted-imports': ['error', { patterns }] },
  })),
);
