"""mixin"""
